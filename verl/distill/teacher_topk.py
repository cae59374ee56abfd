"""The teacher's top-k next-token distribution, computed in the reference pass and carried in the batch.

The distribution-level losses (``forward_kl_topk``, ``reverse_kl_topk``, ``jsd_topk``) need the
teacher's distribution at every response position. verl's reference pass already runs the teacher
(in the reference slot) over every sequence and holds its logits for a moment; there the teacher's
k most likely tokens are picked, and three small per-token fields leave the worker with the
reference log-probs, travel through TransferQueue with the batch and reach the actor update:

    teacher_topk_ids        [r_i, k]  int32    by decreasing probability
    teacher_topk_log_probs  [r_i, k]  float32  log softmax(z / (T_rollout * distill.temperature))
    teacher_tail_log_prob   [r_i]     float32  log of the mass outside the top-k

per sample, over its r_i response positions only (the layout of ``ref_log_prob``: entry t is the
distribution the response's token t was drawn from), as jagged nested tensors. That is
``8 k + 4`` bytes per response token (260 B at k = 32); the vocabulary-sized logits never leave the
reference engine. Embedding rows beyond the tokenizer's length (padded vocabularies) are neither
candidates nor mass.
"""

import functools
import logging
import os
from typing import Callable

import torch
from torch.distributed.tensor import DTensor

from verl.distill.chunked_topk import row_chunks
from verl.distill.divergences import teacher_topk
from verl.distill.loss_config import DistillLossConfig
from verl.utils import tensordict_utils as tu

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

TOPK_IDS_KEY = "teacher_topk_ids"
TOPK_LOG_PROBS_KEY = "teacher_topk_log_probs"
TAIL_LOG_PROB_KEY = "teacher_tail_log_prob"
CARRIED_FIELDS = (TOPK_IDS_KEY, TOPK_LOG_PROBS_KEY, TAIL_LOG_PROB_KEY)

_ID_DTYPE = torch.int32  # any vocabulary below 2^31 tokens
_LOG_PROB_DTYPE = torch.float32


def bytes_per_response_token(k: int) -> int:
    """What the carried fields cost per response token: k ids, k log-probs and one tail log-prob."""
    id_bytes = torch.empty((), dtype=_ID_DTYPE).element_size()
    log_prob_bytes = torch.empty((), dtype=_LOG_PROB_DTYPE).element_size()
    return (id_bytes + log_prob_bytes) * k + log_prob_bytes


def response_positions(input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every response token, in sample order: its sample and the position in that sample's sequence
    whose next-token distribution it was drawn from (one before the token itself).

    ``input_ids`` (prompt + response) and ``response_mask`` are jagged nested tensors, as verl's
    no-padding batches hold them; the response is the tail of each sequence.
    """
    sequence_lengths = input_ids.offsets().diff()
    response_lengths = response_mask.offsets().to(sequence_lengths.device).diff()
    samples = torch.arange(len(response_lengths), device=sequence_lengths.device)
    sample = torch.repeat_interleave(samples, response_lengths)
    response_starts = torch.cumsum(response_lengths, dim=0) - response_lengths
    index_in_response = torch.arange(len(sample), device=sample.device) - response_starts[sample]
    first_position = sequence_lengths - response_lengths - 1
    return sample, first_position[sample] + index_in_response


def packed_response_rows(input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Rows of the packed (prompt + response) token stream whose logits predict the response tokens."""
    sample, position = response_positions(input_ids, response_mask)
    return input_ids.offsets()[:-1][sample] + position


def _teacher_logit_rows(output, output_args: dict, micro_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's logits as [rows, V] (a view, no copy), the row of every response position in it, and
    the rollout temperature there."""
    logits = getattr(output, "logits", None)
    if logits is None:
        raise RuntimeError(
            "the reference engine returned no logits, so the teacher's top-k cannot be computed: "
            "set actor_rollout_ref.model.use_fused_kernels=false for the distribution-level losses"
        )
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    input_ids, response_mask = micro_batch["input_ids"], micro_batch["response_mask"]
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        rows = packed_response_rows(input_ids, response_mask)
        temperature = output_args["temperature_rmpad"].reshape(-1)[rows]
        return logits.reshape(-1, logits.shape[-1]), rows, temperature
    sample, position = response_positions(input_ids, response_mask)
    temperature = output_args["temperature"].reshape(-1)[sample]
    return logits.reshape(-1, logits.shape[-1]), sample * logits.shape[1] + position, temperature


@torch.no_grad()
def teacher_topk_fields(
    output, output_args: dict, micro_batch, options: DistillLossConfig, tokenizer_size: int
) -> dict[str, torch.Tensor]:
    """The carried fields for one micro-batch of the reference pass (see the module docstring).

    ``options.logits_chunk_tokens`` response positions at a time, so that only that many rows of
    float32 logits and log-probs exist at once, however long the micro-batch.
    """
    logits, rows, temperature = _teacher_logit_rows(output, output_args, micro_batch)
    valid_vocab = min(tokenizer_size, logits.shape[-1])
    k = min(options.topk, valid_vocab)
    chunks = []
    with torch.autocast(device_type=logits.device.type, enabled=False):
        for chunk in row_chunks(len(rows), options.logits_chunk_tokens):
            scaled = logits.index_select(0, rows[chunk]).float()
            # both temperatures divided in place, in the order of z / T_rollout / distill.temperature
            scaled.div_(temperature[chunk].float().unsqueeze(-1)).div_(options.temperature)
            chunks.append(teacher_topk(scaled, k=k, temperature=1.0, valid_vocab_size=valid_vocab))
    offsets = micro_batch["response_mask"].offsets().to(logits.device)
    carried = {
        TOPK_IDS_KEY: torch.cat([top.ids for top in chunks]).to(_ID_DTYPE),
        TOPK_LOG_PROBS_KEY: torch.cat([top.log_probs for top in chunks]).to(_LOG_PROB_DTYPE),
        TAIL_LOG_PROB_KEY: torch.cat([top.tail_log_prob for top in chunks]).to(_LOG_PROB_DTYPE),
    }
    return {key: torch.nested.nested_tensor_from_jagged(values, offsets) for key, values in carried.items()}


def carrying_teacher_topk(prepare_model_outputs: Callable, options: DistillLossConfig, tokenizer_size: int) -> Callable:
    """Wrap a reference engine's bound ``prepare_model_outputs`` so that its output also holds the
    teacher's top-k fields; verl's worker then returns them with the reference log-probs."""
    logged = False

    @functools.wraps(prepare_model_outputs)
    def with_teacher_topk(output, output_args, micro_batch, logits_processor_func):
        nonlocal logged
        model_output = prepare_model_outputs(
            output=output, output_args=output_args, micro_batch=micro_batch, logits_processor_func=logits_processor_func
        )
        carried = teacher_topk_fields(output, output_args, micro_batch, options, tokenizer_size)
        model_output.update(carried)
        if not logged:
            logged = True
            response_tokens = carried[TAIL_LOG_PROB_KEY].values().numel()
            carried_bytes = sum(field.values().nbytes for field in carried.values())
            logger.info(
                f"teacher top-k carried from the reference pass: k={carried[TOPK_IDS_KEY].values().shape[-1]}, "
                f"{carried_bytes / max(response_tokens, 1):.0f} bytes per response token"
            )
        return model_output

    return with_teacher_topk
