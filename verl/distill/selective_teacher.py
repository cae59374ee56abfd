"""The v1 trainer's reference (teacher) pass on the selected responses only.

verl's ``PPOTrainer._compute_ref_log_prob`` has the reference worker score every row of the batch.
With ``actor_rollout_ref.actor.distill.select_strategy`` other than ``all``,
:func:`selective_reference_pass` replaces it (run-time adaptation in :mod:`verl.distill.compat`):

1. it reads each row's prompt group (``uid``), prompt ids, response mask and, for ``best``/``worst``,
   the reward manager's scores (``rm_scores``: the agent loop, or the colocated reward model of step 2
   of ``_step_once``, wrote them before this phase);
2. picks ``select_k`` rows per group (:func:`verl.distill.response_selection.select_responses`);
3. runs verl's own reference pass on a sub-batch holding only those rows (rounded up to a multiple of
   the reference mesh's data-parallel size with the cheapest other rows, then balanced across its
   ranks), so the teacher's forward never sees the other rows. verl's engine cuts a rank's rows into
   equal micro-batches of ``ref.log_prob_micro_batch_size_per_gpu``, a size chosen for the whole
   batch: the sub-batch carries the largest size up to it that divides its rows per rank;
4. writes ``ref_log_prob`` = 0 for the rows the teacher did not score, and for every row the per-token
   :data:`~verl.distill.response_selection.KL_WEIGHT_KEY` the losses read: the KL to the teacher is
   then a token mean over the selected responses, and 0 elsewhere. The policy-gradient term of the
   ``hybrid`` loss still sees every row.

Metrics: ``distill/select_ratio`` (selected responses / responses), ``distill/teacher_rows`` and
``distill/teacher_tokens`` (rows, and prompt + response tokens, that the reference worker scored and
returned), ``distill/teacher_token_share`` (those tokens / the tokens a stock reference pass scores).
"""

import functools
from collections.abc import Callable

import torch
from tensordict import TensorDict

from verl.distill.micro_batches import MICRO_BATCH_KEY, configured_log_prob_micro_batch, micro_batch_for
from verl.distill.response_selection import (
    KL_WEIGHT_KEY,
    REWARD_RANKED_STRATEGIES,
    group_seed,
    select_responses,
    teacher_token_weights,
    trajectory_order,
)
from verl.distill.validation_teacher_kl import VALIDATION_PARTITION

SELECT_STRATEGY_KEY = "actor_rollout_ref.actor.distill.select_strategy"


def selection_options(config) -> tuple[str, int]:
    """(select_strategy, select_k) of a trainer config (``all``, 1 when the ``distill`` node lacks them)."""
    options = config.actor_rollout_ref.actor.get("distill", None) or {}
    return str(options.get("select_strategy", "all")), int(options.get("select_k", 1))


def _reference_dp_size(trainer) -> int:
    worker_group = trainer.ref_policy_wg
    if "ref" not in worker_group._dispatch_info:
        worker_group._dispatch_info["ref"] = worker_group._query_dispatch_info("ref")
    return max(worker_group._dispatch_info["ref"]) + 1


def _rows_for_the_teacher(batch, selected: list[bool], dp_size: int) -> list[int]:
    """The selected rows, plus the cheapest others (verl's padding rows first) up to a multiple of
    ``dp_size``, ordered so that each data-parallel rank gets a similar number of tokens."""
    rows = [row for row, keep in enumerate(selected) if keep]
    shortfall = -len(rows) % dp_size
    if shortfall:
        others = sorted(
            (row for row, keep in enumerate(selected) if not keep),
            key=lambda row: (not batch.tags[row].get("is_padding", False), batch.tags[row]["seq_len"]),
        )
        rows += others[:shortfall]
    if dp_size > 1:
        from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

        workload = calculate_workload(torch.tensor([batch.tags[row]["seq_len"] for row in rows]))
        partitions = get_seqlen_balanced_partitions(workload, k_partitions=dp_size, equal_size=True)
        rows = [rows[i] for partition in partitions for i in partition]
    return rows


def _per_token(values: list[float], lengths: list[int]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(
        [torch.full((length,), value, dtype=torch.float32) for value, length in zip(values, lengths, strict=True)],
        layout=torch.jagged,
    )


def selective_reference_pass(stock_phase: Callable) -> Callable:
    """Wrap verl's ``PPOTrainer._compute_ref_log_prob(trainer, batch, metrics)`` (see the module doc)."""

    @functools.wraps(stock_phase)
    def compute_ref_log_prob(trainer, batch, metrics: dict):
        import transfer_queue as tq

        strategy, k = selection_options(trainer.config)
        # the teacher KL at validation scores every validation response (one per prompt group there)
        if strategy == "all" or len(batch) == 0 or batch.partition_id == VALIDATION_PARTITION:
            return stock_phase(trainer, batch, metrics)

        fields = ["uid", "prompts", "response_mask"]
        if strategy in REWARD_RANKED_STRATEGIES:
            fields.append("rm_scores")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        # a list, NonTensorStack or numpy array depending on the TransferQueue backend
        groups = [str(uid) for uid in list(data["uid"])]
        response_masks = data["response_mask"].unbind()
        response_tokens = [int(mask.sum()) for mask in response_masks]
        padding = [tag.get("is_padding", False) for tag in batch.tags]

        real = [row for row in range(len(batch)) if not padding[row]]
        base_seed = trainer.config.data.get("seed", None) or 0
        prompts = data["prompts"].unbind()
        seeds = {groups[row]: group_seed(base_seed, trainer.global_steps, prompts[row].tolist()) for row in real}
        scores = None
        if "rm_scores" in fields:
            scores = [float(row_scores.sum()) for row_scores in data["rm_scores"].unbind()]
            scores = [scores[row] for row in real]
        chosen = select_responses(
            [groups[row] for row in real],
            [trajectory_order(batch.keys[row], groups[row]) for row in real],
            strategy,
            k,
            seeds,
            scores,
        )
        selected = [False] * len(batch)
        for row, keep in zip(real, chosen, strict=True):
            selected[row] = keep

        dp_size = _reference_dp_size(trainer)
        teacher_rows = _rows_for_the_teacher(batch, selected, dp_size)
        sub_batch = batch.select_keys([batch.keys[row] for row in teacher_rows])
        configured = configured_log_prob_micro_batch(trainer.config.actor_rollout_ref.ref, dp_size)
        if configured is not None:
            sub_batch.extra_info[MICRO_BATCH_KEY] = micro_batch_for(len(teacher_rows) // dp_size, configured)
        stock_phase(trainer, sub_batch, metrics)
        # what verl's phase leaves in the batch's info for the phases after it (not the reference
        # pass's micro-batch size, which the actor's worker would read as its own)
        batch.extra_info.update({key: value for key, value in sub_batch.extra_info.items() if key != MICRO_BATCH_KEY})

        scored = set(teacher_rows)
        unscored = [row for row in range(len(batch)) if row not in scored]
        lengths = [mask.numel() for mask in response_masks]
        if unscored:
            tq.kv_batch_put(
                keys=[batch.keys[row] for row in unscored],
                partition_id=batch.partition_id,
                fields=TensorDict(
                    {"ref_log_prob": _per_token([0.0] * len(unscored), [lengths[row] for row in unscored])},
                    batch_size=len(unscored),
                ),
            )
        weights = teacher_token_weights(selected, response_tokens)
        tq.kv_batch_put(
            keys=batch.keys,
            partition_id=batch.partition_id,
            fields=TensorDict({KL_WEIGHT_KEY: _per_token(weights, lengths)}, batch_size=len(batch)),
        )

        all_tokens = sum(tag["seq_len"] for tag in batch.tags)
        teacher_tokens = sum(batch.tags[row]["seq_len"] for row in teacher_rows)
        metrics.update(
            {
                "distill/select_ratio": sum(selected) / max(len(real), 1),
                "distill/teacher_rows": float(len(teacher_rows)),
                "distill/teacher_tokens": float(teacher_tokens),
                "distill/teacher_token_share": teacher_tokens / max(all_tokens, 1),
            }
        )
        return batch

    return compute_ref_log_prob
