"""Micro-batch sizes for a log-prob pass over a batch other than the one its config was sized for.

verl's engine splits each rank's rows into equal micro-batches of ``micro_batch_size_per_gpu`` rows and
refuses a rank's rows that the size does not divide. Its training step rounds the batch to fit; the
passes verl-distill adds (the teacher on the selected responses, student and teacher on the validation
responses) see other row counts, and hand the workers a size that divides them in the batch's info,
which the worker reads before its own config.
"""

from typing import Optional

# the batch-info key a worker's forward pass reads its micro-batch size from, before its config
MICRO_BATCH_KEY = "micro_batch_size_per_gpu"


def configured_log_prob_micro_batch(node, dp_size: int) -> Optional[int]:
    """A log-prob pass's fixed micro-batch size per rank (``node``: ``actor_rollout_ref.ref`` or
    ``.rollout``), None with dynamic batch sizes or when unset."""
    if node.get("log_prob_use_dynamic_bsz", False):
        return None
    if node.get("log_prob_micro_batch_size_per_gpu", None):
        return int(node.log_prob_micro_batch_size_per_gpu)
    if node.get("log_prob_micro_batch_size", None):
        return max(int(node.log_prob_micro_batch_size) // dp_size, 1)
    return None


def micro_batch_for(rows_per_rank: int, configured: int) -> int:
    """The largest micro-batch size of at most ``configured`` rows that divides ``rows_per_rank``."""
    return max(size for size in range(1, min(configured, rows_per_rank) + 1) if rows_per_rank % size == 0)
