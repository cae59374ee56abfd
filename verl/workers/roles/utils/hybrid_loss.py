"""verl-distill's ``hybrid`` loss: the task reward's policy gradient plus the distillation KL to the teacher.

    loss = rl_coef * pg_loss + distillation_coef * kl_loss - entropy_coeff * entropy_loss

* ``pg_loss``: verl's policy loss named by ``distill.rl_policy_loss`` (PPO-clip by default) on the
  advantages the trainer computed from the reward manager's scores. The loss reads only
  ``data["advantages"]``, so GRPO (group-normalised scores) and PPO (GAE with a critic) both work.
* ``kl_loss``: the sampled-token estimate of KL(student || teacher) with ``actor.kl_loss_type``, the
  same per-token term as the ``distillation`` loss, with the teacher's log-probs from the reference
  slot (``data["ref_log_prob"]``). With ``distill.select_strategy`` other than ``all`` (GKD's
  selection) it covers only the responses the teacher scored, ``pg_loss`` still every response.

``distill.rl_coef`` and ``distill.distillation_coef`` are the only weights: ``actor.kl_loss_coef`` is not
read, so the teacher term is never weighted twice. ``distillation`` with ``kl_loss_coef = c`` equals
``hybrid`` with ``rl_coef = 0, distillation_coef = c``; ``hybrid`` with ``distillation_coef = 0`` equals
verl's ``ppo_loss`` with ``use_kl_loss = false``.
"""

import torch
from tensordict import TensorDict

from verl.distill.divergences import check_sampled_kl_estimator
from verl.distill.loss_config import CONFIG_KEY, DistillLossConfig
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.roles.utils.losses import (
    TeacherScoredTokens,
    global_batch_info_for,
    loss_metric_aggregation,
    sampled_kl_to_teacher,
)
from verl.workers.utils.padding import no_padding_2_padding


def _policy_loss_fn(name: str):
    if name not in POLICY_LOSS_REGISTRY:
        raise ValueError(
            f"Unknown {CONFIG_KEY}.rl_policy_loss={name!r}; valid (verl's policy losses): "
            f"{', '.join(POLICY_LOSS_REGISTRY)}"
        )
    return POLICY_LOSS_REGISTRY[name]


def hybrid_loss(config, model_output, data: TensorDict, dp_group=None):
    """rl_coef * pg_loss + distillation_coef * kl_loss - entropy_coeff * entropy_loss, on the global batch.

    pg_loss = agg(l_t) with l_t verl's per-token policy loss, e.g. for PPO-clip (``vanilla``)
    l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high)) with rho_t = pi(y_t) / pi_old(y_t)
    (``old_log_probs``), times ``rollout_is_weights`` when the trainer sent them, exactly as verl's
    ``ppo_loss`` calls it. kl_loss = agg(k_t) with k_t the ``kl_loss_type`` estimate of
    KL(pi || nu) on the sampled token (:func:`verl.distill.divergences.sampled_token_kl`). ``agg`` is
    ``agg_loss`` with ``actor.loss_agg_mode`` normalised over the GLOBAL batch, so the summed loss and
    gradient do not depend on the micro-batch split.

    Metrics (the trainer prefixes ``actor/``): pg_loss and kl_loss (each unweighted), rl_coef,
    distillation_coef, distillation_mode (1.0), verl's policy-loss metrics (pg_clipfrac, ppo_kl, ...),
    teacher_log_prob_mean (after the floor), student_log_prob_mean, entropy_loss when entropy was computed.
    """
    options = getattr(config, "distill", None) or DistillLossConfig()
    policy_loss_fn = _policy_loss_fn(options.rl_policy_loss)
    check_sampled_kl_estimator(config.kl_loss_type)
    if "ref_log_prob" not in data.keys():
        raise ValueError(
            "hybrid loss: data has no 'ref_log_prob' (the teacher's log-probs from the reference slot); "
            "set actor_rollout_ref.actor.use_kl_loss=true so that verl builds the reference worker"
        )

    student_log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    global_batch_info = global_batch_info_for(config, data)
    metric_aggregation = loss_metric_aggregation(global_batch_info)

    fields = ["response_mask", "old_log_probs", "advantages", "ref_log_prob", *TeacherScoredTokens.fields(data)]
    if "rollout_is_weights" in data.keys():
        fields.append("rollout_is_weights")
    padded = data.select(*fields).to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    scored = TeacherScoredTokens.from_padded(padded, response_mask)

    pg_loss, pg_metrics = policy_loss_fn(
        old_log_prob=padded["old_log_probs"],
        log_prob=student_log_prob,
        advantages=padded["advantages"],
        response_mask=response_mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=padded.get("rollout_is_weights", None),
    )

    teacher_log_prob, per_token_kl = sampled_kl_to_teacher(
        config, options, student_log_prob, padded["ref_log_prob"], scored.mask
    )
    kl_loss = scored.aggregate(per_token_kl, config, options, global_batch_info)
    loss = options.rl_coef * pg_loss + options.distillation_coef * kl_loss

    def token_mean(values: torch.Tensor) -> Metric:
        return Metric(value=scored.token_mean(values, global_batch_info), aggregation=metric_aggregation)

    # verl's policy-loss metrics are means over this micro-batch (as ppo_loss aggregates them).
    metrics = Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN)
    metrics.update(
        {
            "pg_loss": Metric(value=pg_loss, aggregation=metric_aggregation),
            "kl_loss": Metric(value=kl_loss, aggregation=metric_aggregation),
            "rl_coef": options.rl_coef,
            "distillation_coef": options.distillation_coef,
            "distillation_mode": 1.0,
            "teacher_log_prob_mean": token_mean(teacher_log_prob.clamp(min=options.teacher_log_prob_floor)),
            "student_log_prob_mean": token_mean(student_log_prob),
        }
    )

    if entropy is not None:
        entropy_loss = agg_loss(
            loss_mat=no_padding_2_padding(entropy, data),
            loss_mask=response_mask,
            loss_agg_mode=config.loss_agg_mode,
            **global_batch_info,
        )
        loss = loss - config.entropy_coeff * entropy_loss
        metrics["entropy_loss"] = Metric(value=entropy_loss, aggregation=metric_aggregation)

    return loss, metrics
