"""Distribution-level distillation losses: the divergence between the student's and the teacher's
whole next-token distributions at every response position, not just at the sampled token.

    forward_kl_topk:  KL(ν || π)            (mass-covering)
    reverse_kl_topk:  KL(π || ν)            (mode-seeking)
    jsd_topk:         generalized JSD_β     (β = 0 forward, β = 1 reverse)

over the teacher's top-k tokens plus one tail bucket holding the rest of the vocabulary, so each
value is a true divergence between (k+1)-category distributions (see :mod:`verl.distill.divergences`).
With ``distill.topk`` equal to the tokenizer's length the loss is the exact full-vocabulary divergence.
Both distributions are ``softmax(logits / (T_rollout · distill.temperature))``.

Where the teacher's distribution comes from: verl's reference pass runs the teacher (in the
reference slot) anyway; there its top-k ids, log-probs and tail log-prob are computed for every
response position and carried in the batch (:mod:`verl.distill.teacher_topk`, 8k + 4 bytes per
response token). The update reads them from its micro-batch: no second teacher forward, and no
vocabulary-sized tensor crosses Ray.

A loss here is called twice per micro-batch by verl's engine: first as its logits processor
(``student_logits=…``), returning per-position values, then as the loss (``model_output=…``),
aggregating them over response tokens of the global batch.
"""

import torch
from tensordict import TensorDict

from verl.distill.divergences import forward_kl_topk, jsd_topk, reverse_kl_topk
from verl.distill.loss_config import DistillLossConfig
from verl.distill.teacher_topk import (
    CARRIED_FIELDS,
    TAIL_LOG_PROB_KEY,
    TOPK_IDS_KEY,
    TOPK_LOG_PROBS_KEY,
    packed_response_rows,
)
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import Metric
from verl.workers.roles.utils.losses import global_batch_info_for, loss_metric_aggregation
from verl.workers.utils.padding import no_padding_2_padding

TOKEN_DIVERGENCE_KEY = "distill_token_divergence"
TOPK_COVERAGE_KEY = "distill_sampled_token_in_teacher_topk"


def _carried_teacher_topk(name: str, data: TensorDict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [key for key in CARRIED_FIELDS if key not in data.keys()]
    if missing:
        raise RuntimeError(
            f"{name} reads the teacher's top-k computed in the reference pass, but the micro-batch has no "
            f"{', '.join(missing)}: keep actor_rollout_ref.actor.use_kl_loss=true (it builds the reference "
            "worker) and the teacher in actor_rollout_ref.ref.model.path"
        )
    return tuple(data[key].values() for key in (TOPK_IDS_KEY, TOPK_LOG_PROBS_KEY, TAIL_LOG_PROB_KEY))


def _per_position_outputs(name: str, config, student_logits: torch.Tensor, data: TensorDict) -> dict:
    """The divergence at every response row of the packed micro-batch (0 on prompt rows), and whether
    the sampled token is among the teacher's top-k there."""
    options: DistillLossConfig = getattr(config, "distill", None) or DistillLossConfig()
    ids, log_probs, tail_log_prob = _carried_teacher_topk(name, data)
    input_ids = data["input_ids"]
    rows = packed_response_rows(input_ids, data["response_mask"]).to(student_logits.device)
    valid_vocab = min(len(config.model_config.tokenizer), student_logits.shape[-1])
    if ids.numel() and int(ids.max()) >= valid_vocab:
        raise RuntimeError(
            f"{name}: the teacher's top-k holds token id {int(ids.max())}, beyond the student's {valid_vocab} "
            "vocabulary rows: student and teacher must share the tokenizer (actor_rollout_ref.model.path, "
            "actor_rollout_ref.ref.model.path)"
        )
    common = dict(
        teacher_tail_log_prob=tail_log_prob,
        temperature=options.temperature,
        teacher_log_prob_floor=options.teacher_log_prob_floor,
        # the rows are picked chunk by chunk inside the loss: no [response tokens, V] copy of the logits
        rows=rows,
        valid_vocab_size=valid_vocab,
        chunk_tokens=options.logits_chunk_tokens,
    )
    if name == "forward_kl_topk":
        divergence = forward_kl_topk(student_logits, ids, log_probs, **common)
    elif name == "reverse_kl_topk":
        divergence = reverse_kl_topk(student_logits, ids, log_probs, **common)
    else:
        divergence = jsd_topk(student_logits, ids, log_probs, beta=options.jsd_beta, **common)
    sampled_tokens = input_ids.values()[rows + 1]
    in_topk = (ids == sampled_tokens.unsqueeze(-1)).any(dim=-1)
    packed_rows = student_logits.shape[0]
    return {
        TOKEN_DIVERGENCE_KEY: divergence.new_zeros(packed_rows).index_copy(0, rows, divergence),
        TOPK_COVERAGE_KEY: divergence.new_zeros(packed_rows).index_copy(0, rows, in_topk.float()),
    }


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
        "teacher_topk_coverage": token_mean(no_padding_2_padding(model_output[TOPK_COVERAGE_KEY], data)),
        "kl_coef": config.kl_loss_coef,
        "pg_loss": 0.0,
        "distillation_mode": 1.0,
        "teacher_log_prob_mean": token_mean(padded["ref_log_prob"]),
    }
    if model_output.get("log_probs", None) is not None:
        metrics["student_log_prob_mean"] = token_mean(no_padding_2_padding(model_output["log_probs"], data))
    return divergence_loss * config.kl_loss_coef, metrics


def _distribution_loss(name: str):
    def loss_fn(config, model_output=None, data: TensorDict = None, dp_group=None, *, student_logits=None):
        if student_logits is not None:
            outputs = _per_position_outputs(name, config, student_logits.squeeze(0), data)
            return {key: values.unsqueeze(0) for key, values in outputs.items()}
        return _aggregate(name, config, model_output, data)

    loss_fn.__name__ = loss_fn.__qualname__ = f"{name}_loss"
    return loss_fn


forward_kl_topk_loss = _distribution_loss("forward_kl_topk")
reverse_kl_topk_loss = _distribution_loss("reverse_kl_topk")
jsd_topk_loss = _distribution_loss("jsd_topk")
