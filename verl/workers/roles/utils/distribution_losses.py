"""Distribution-level distillation losses: the divergence between the student's and the teacher's
whole next-token distributions at every response position, not just at the sampled token.

    forward_kl_topk:  KL(ν || π)            (mass-covering)
    reverse_kl_topk:  KL(π || ν)            (mode-seeking)
    jsd_topk:         generalized JSD_β     (β = 0 forward, β = 1 reverse)

over the teacher's top-k tokens plus one tail bucket holding the rest of the vocabulary, so each
value is a true divergence between (k+1)-category distributions (see :mod:`verl.distill.divergences`).
With ``distill.topk`` at least the tokenizer's size the loss is the exact full-vocabulary divergence.
Both distributions are ``softmax(logits / (T_rollout · distill.temperature))``.

Where the teacher's distribution comes from: the teacher sits in the reference slot of the same
worker process as the student, so its logits are computed next to the student's, on the same packed
micro-batch, during the update (no gradient). No vocabulary-sized tensor, and no top-k either,
crosses Ray; the price is a second teacher forward per update (the reference pass still computes
the teacher's sampled-token log-probs for the metrics).

A loss here is called twice per micro-batch by verl's engine: first as its logits processor
(``student_logits=…``), returning the per-position divergence, then as the loss
(``model_output=…``), aggregating it over response tokens of the global batch.
"""

import torch
from tensordict import TensorDict

from verl.distill.divergences import forward_kl_topk, jsd_topk, reverse_kl_topk, teacher_topk
from verl.distill.loss_config import DistillLossConfig
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.workers.roles.utils.losses import global_batch_info_for, loss_metric_aggregation
from verl.workers.utils.padding import no_padding_2_padding

TOKEN_DIVERGENCE_KEY = "distill_token_divergence"


def _teacher_logits(teacher_engine, micro_batch: TensorDict) -> torch.Tensor:
    """The teacher's temperature-scaled logits on the student's packed tokens, shape [nnz, V_teacher]."""
    model_inputs, output_args = teacher_engine.prepare_model_inputs(micro_batch=micro_batch)
    with torch.no_grad():
        logits = teacher_engine.module(**model_inputs, use_cache=False).logits
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        return logits.squeeze(0).float() / output_args["temperature_rmpad"].squeeze(0).unsqueeze(-1)
    # padded layout: keep each sequence's real tokens, in the order the engine packs the student's
    lengths = micro_batch["input_ids"].offsets().diff().tolist()
    temperature = output_args["temperature"].float()
    rows = [logits[i, :length].float() / temperature[i] for i, length in enumerate(lengths)]
    return torch.cat(rows)


def _per_position_divergence(name: str, config, student_logits, teacher_logits) -> torch.Tensor:
    options: DistillLossConfig = getattr(config, "distill", None) or DistillLossConfig()
    valid_vocab = min(len(config.model_config.tokenizer), student_logits.shape[-1], teacher_logits.shape[-1])
    top = teacher_topk(
        teacher_logits, k=min(options.topk, valid_vocab), temperature=options.temperature, valid_vocab_size=valid_vocab
    )
    common = dict(
        teacher_tail_log_prob=top.tail_log_prob,
        temperature=options.temperature,
        teacher_log_prob_floor=options.teacher_log_prob_floor,
    )
    student = student_logits[..., :valid_vocab]
    if name == "forward_kl_topk":
        return forward_kl_topk(student, top.ids, top.log_probs, **common)
    if name == "reverse_kl_topk":
        return reverse_kl_topk(student, top.ids, top.log_probs, **common)
    return jsd_topk(student, top.ids, top.log_probs, beta=options.jsd_beta, **common)


def _aggregate(name: str, config, model_output, data: TensorDict):
    divergence = no_padding_2_padding(model_output[TOKEN_DIVERGENCE_KEY], data)
    padded = data.select("response_mask", "ref_log_prob").to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    global_batch_info = global_batch_info_for(config, data)
    aggregation = loss_metric_aggregation(global_batch_info)
    divergence_loss = agg_loss(divergence, response_mask, config.loss_agg_mode, **global_batch_info)

    def token_mean(values: torch.Tensor) -> Metric:
        mean = agg_loss(values.detach().float(), response_mask, "token-mean", **global_batch_info)
        return Metric(value=mean, aggregation=aggregation)

    metrics = {
        "kl_loss": Metric(value=divergence_loss, aggregation=aggregation),
        "kl_coef": config.kl_loss_coef,
        "pg_loss": 0.0,
        "distillation_mode": 1.0,
        "teacher_log_prob_mean": token_mean(padded["ref_log_prob"]),
    }
    if model_output.get("log_probs", None) is not None:
        metrics["student_log_prob_mean"] = token_mean(no_padding_2_padding(model_output["log_probs"], data))
    return divergence_loss * config.kl_loss_coef, metrics


def _distribution_loss(name: str):
    def loss_fn(
        config, model_output=None, data: TensorDict = None, dp_group=None, *, student_logits=None, teacher_engine=None
    ):
        if student_logits is not None:
            if teacher_engine is None:
                raise RuntimeError(
                    f"{name} needs the teacher's logits in the actor update, but the actor has no teacher engine: "
                    "set actor_rollout_ref.ref.model.path and keep the ref colocated with the actor"
                )
            teacher_logits = _teacher_logits(teacher_engine, data)
            divergence = _per_position_divergence(name, config, student_logits.squeeze(0), teacher_logits)
            return {TOKEN_DIVERGENCE_KEY: divergence.unsqueeze(0)}
        return _aggregate(name, config, model_output, data)

    loss_fn.__name__ = loss_fn.__qualname__ = f"{name}_loss"
    return loss_fn


forward_kl_topk_loss = _distribution_loss("forward_kl_topk")
reverse_kl_topk_loss = _distribution_loss("reverse_kl_topk")
jsd_topk_loss = _distribution_loss("jsd_topk")
