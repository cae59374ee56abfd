"""Log-probabilities of the sampled tokens, computed in blocks of rows (the CPU backend's version).

Without flash-attn or an NPU, verl takes its portable fallback, which walks the logits one row at a
time so that a GPU never holds a second vocabulary-sized copy of the batch's logits. On a CPU the
~1,100 rows of a toy batch (64 samples of ~17 tokens) make 3,300 small operations forward and as
many backward: 35-45 ms per pass, as long as the model's own forward. Here the rows are taken in
blocks of at most :data:`ELEMENTS_PER_BLOCK` logits, one vectorized operation per block, which keeps
the memory bound and gives the same values:

    log p(y_t) = z_t[y_t] - logsumexp(z_t)         for float32 / float64 logits
    log p(y_t) = log_softmax(z_t)[y_t]             for lower precisions (logsumexp loses accuracy there)
"""

import torch

ELEMENTS_PER_BLOCK = 1 << 24  # 64 MiB of float32 logits at a time


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``log softmax(logits)[labels]`` over the last dimension; the signature of verl's
    ``logprobs_from_logits`` (``inplace_backward`` only matters to flash-attn's kernel)."""
    vocabulary = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocabulary)
    flat_labels = labels.reshape(-1, 1)
    rows_per_block = max(1, ELEMENTS_PER_BLOCK // vocabulary)
    blocks = [
        _block_log_probs(flat_logits[start : start + rows_per_block], flat_labels[start : start + rows_per_block])
        for start in range(0, flat_logits.shape[0], rows_per_block)
    ]
    return torch.cat(blocks).view(logits.shape[:-1]) if blocks else flat_logits.new_empty(logits.shape[:-1])


def _block_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, labels).squeeze(-1)
