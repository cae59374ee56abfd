"""verl-distill's ``distillation`` loss: a KL term toward the teacher and no policy-gradient term.

The teacher lives in verl's reference slot, so its log-probs on the student's own tokens arrive as
``data["ref_log_prob"]``, computed by the same engine code as the student's.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from tensordict import TensorDict

from verl.distill.divergences import check_sampled_kl_estimator, sampled_token_kl
from verl.distill.loss_config import DistillLossConfig
from verl.distill.response_selection import KL_WEIGHT_KEY
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding


def global_batch_info_for(config, data: TensorDict) -> dict:
    """Global batch sizes for ``agg_loss``: each micro-batch's loss is its share of the global-batch loss.

    Also stored on ``config.global_batch_info``, as verl's ``ppo_loss`` does.
    """
    info = {
        "dp_size": data["dp_size"],
        "batch_num_tokens": data["batch_num_tokens"],
        "global_batch_size": data["global_batch_size"],
        "loss_scale_factor": config.loss_scale_factor,
    }
    config.global_batch_info.update(info)
    return info


def loss_metric_aggregation(global_batch_info: dict) -> AggregationType:
    # A loss normalized by global sizes is a partial sum per micro-batch (verl's ppo_loss rule).
    normalized_globally = global_batch_info["dp_size"] > 1 or any(
        global_batch_info[key] is not None for key in ("batch_num_tokens", "global_batch_size", "loss_scale_factor")
    )
    return AggregationType.SUM if normalized_globally else AggregationType.MEAN


@dataclass
class TeacherScoredTokens:
    """The response tokens of a micro-batch the teacher scored: all of them, unless
    ``distill.select_strategy`` had it score only some responses (:mod:`verl.distill.selective_teacher`).
    Then ``weight`` is the batch's :data:`KL_WEIGHT_KEY`: 0 off the scored tokens and, on them,
    (response tokens) / (scored response tokens) of the step's batch."""

    response_mask: torch.Tensor
    weight: Optional[torch.Tensor] = None

    @classmethod
    def fields(cls, data: TensorDict) -> list[str]:
        """The fields to pad together with ``response_mask`` for :meth:`from_padded`."""
        return [KL_WEIGHT_KEY] if KL_WEIGHT_KEY in data.keys() else []

    @classmethod
    def from_padded(cls, padded: TensorDict, response_mask: torch.Tensor) -> "TeacherScoredTokens":
        weight = padded.get(KL_WEIGHT_KEY, None)
        return cls(response_mask, None if weight is None else weight.float())

    @property
    def mask(self) -> torch.Tensor:
        return self.response_mask if self.weight is None else self.response_mask & (self.weight > 0)

    def aggregate(self, per_token: torch.Tensor, config, options: DistillLossConfig, global_batch_info: dict):
        """``agg_loss`` with ``actor.loss_agg_mode`` over the scored tokens, as if the batch held only
        the scored responses: token-mean divides by their token count (exact when a step's batch is one
        mini-batch, else the step's share), seq-mean-* by their number (select_k of every rollout.n)."""
        mode = config.loss_agg_mode
        if self.weight is None:
            return agg_loss(per_token, self.response_mask, mode, **global_batch_info)
        if mode == "token-mean":
            return agg_loss(per_token * self.weight, self.response_mask, mode, **global_batch_info)
        loss = agg_loss(per_token, self.mask, mode, **global_batch_info)
        if mode.startswith("seq-mean"):
            loss = loss * (config.rollout_n / min(options.select_k, config.rollout_n))
        return loss

    def token_mean(self, values: torch.Tensor, global_batch_info: dict) -> torch.Tensor:
        """Mean of ``values`` over the scored tokens of the global batch (this micro-batch's share)."""
        values = values.detach().float()
        if self.weight is not None:
            values = values * self.weight
        return agg_loss(values, self.response_mask, "token-mean", **global_batch_info)


def sampled_kl_to_teacher(config, options: DistillLossConfig, student_log_prob, teacher_slot, response_mask):
    """(teacher log-probs, per-token ``actor.kl_loss_type`` KL) on the response tokens.

    Outside ``response_mask`` (the tokens the teacher scored) the teacher is set equal to the student:
    whatever the slot holds there (0, -inf, NaN) yields a zero KL and a zero gradient.
    """
    teacher_log_prob = torch.where(response_mask, teacher_slot.float(), student_log_prob.detach().float())
    per_token_kl = sampled_token_kl(
        student_log_prob,
        teacher_log_prob,
        config.kl_loss_type,
        log_ratio_clamp=options.log_ratio_clamp,
        teacher_log_prob_floor=options.teacher_log_prob_floor,
    )
    return teacher_log_prob, per_token_kl


def distillation_loss(config, model_output, data: TensorDict, dp_group=None):
    """KL(student || teacher) on the student's sampled response tokens, times ``actor.kl_loss_coef``.

    loss = kl_loss_coef * agg(kl_t) - entropy_coeff * agg(entropy_t)   (the entropy term only when
    the engine computed entropy), where kl_t is the ``actor.kl_loss_type`` estimator on token t
    (see :func:`verl.distill.divergences.sampled_token_kl`) and ``agg`` is ``agg_loss`` with
    ``actor.loss_agg_mode`` normalized over the GLOBAL batch, so splitting it into micro-batches
    changes neither the summed loss nor the gradient. No policy-gradient term is computed.

    Engine calling convention (verl's ``ppo_loss``): ``model_output["log_probs"]`` nested over the
    whole sequences (NO_PADDING), ``data`` the micro-batch with ``response_mask``, ``ref_log_prob``
    (the teacher) and the global batch sizes ``dp_size``, ``batch_num_tokens``, ``global_batch_size``.
    Options come from ``config.distill`` (:class:`DistillLossConfig`), defaults when absent.

    Metrics (the trainer prefixes ``actor/``): kl_loss, kl_coef, pg_loss (0.0), distillation_mode
    (1.0), teacher_log_prob_mean (after the floor) and student_log_prob_mean (token means over the
    global batch), entropy_loss when entropy was computed. With ``distill.select_strategy`` other than
    ``all`` the KL and the two means cover only the tokens the teacher scored (:class:`TeacherScoredTokens`).
    """
    options = getattr(config, "distill", None)
    if options is None:
        options = DistillLossConfig()
    check_sampled_kl_estimator(config.kl_loss_type)
    if "ref_log_prob" not in data.keys():
        raise ValueError(
            "distillation loss: data has no 'ref_log_prob' (the teacher's log-probs from the reference slot); "
            "set actor_rollout_ref.actor.use_kl_loss=true so that verl builds the reference worker"
        )

    student_log_prob = no_padding_2_padding(model_output["log_probs"], data).float()
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)

    global_batch_info = global_batch_info_for(config, data)
    metric_aggregation = loss_metric_aggregation(global_batch_info)

    padded = data.select("response_mask", "ref_log_prob", *TeacherScoredTokens.fields(data)).to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    scored = TeacherScoredTokens.from_padded(padded, response_mask)
    teacher_log_prob, per_token_kl = sampled_kl_to_teacher(
        config, options, student_log_prob, padded["ref_log_prob"], scored.mask
    )
    kl_loss = scored.aggregate(per_token_kl, config, options, global_batch_info)
    loss = kl_loss * config.kl_loss_coef

    def token_mean(values: torch.Tensor) -> Metric:
        return Metric(value=scored.token_mean(values, global_batch_info), aggregation=metric_aggregation)

    metrics = {
        "kl_loss": Metric(value=kl_loss, aggregation=metric_aggregation),
        "kl_coef": config.kl_loss_coef,
        "pg_loss": 0.0,
        "distillation_mode": 1.0,
        "teacher_log_prob_mean": token_mean(teacher_log_prob.clamp(min=options.teacher_log_prob_floor)),
        "student_log_prob_mean": token_mean(student_log_prob),
    }

    if entropy is not None:
        entropy_loss = agg_loss(
            loss_mat=entropy, loss_mask=response_mask, loss_agg_mode=config.loss_agg_mode, **global_batch_info
        )
        loss = loss - config.entropy_coeff * entropy_loss
        metrics["entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)

    return loss, metrics
