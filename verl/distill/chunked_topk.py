"""The student's log-probs over the teacher's top-k tokens plus the tail bucket, a chunk of rows at a time.

The distribution-level losses need, at every response position, log q = log_softmax(z / T) of the
student gathered at the teacher's k ids, and the tail log q(rest) = logsumexp of log q over every
other vocabulary row. Written as plain tensor code over all R response rows, autograd keeps several
[R, V] float32 tensors for the backward (the log-softmax, the masked copy for the tail, the mask), and
the forward and backward make more; at V = 152k one such copy costs 0.6 MB per token.

:func:`student_topk_log_probs` produces the same [R, k + 1] values with a custom autograd function:

* forward: one chunk of rows at a time, it copies the chunk's logits, takes the log-softmax, gathers
  the top-k, and reduces the rest to the tail in place; it keeps only [R, k + 1] values for the
  backward, plus a reference to the logits (no copy: verl's log-prob pass keeps them alive anyway).
* backward: per chunk it recomputes the log-softmax from the logits (and stops if its top-k values
  differ from the forward's: the logits were written in place in between), writes the closed-form
  gradient into the same memory (below), then adds it into the logits' gradient.

So the working memory is about two [chunk, V] float32 blocks, whatever R is, and the only
vocabulary-sized tensor that grows with R is the logits' gradient itself (in the logits' dtype).

Gradient. With h = dL/d log q (the top-k grads g_i at the ids, g_tail * r_j = g_tail * q_j / q_tail on
every row j outside the top-k, 0 elsewhere), log-softmax gives dL/dz_j = (h_j - q_j * sum(h)) / T and
sum(h) = sum_i g_i + g_tail (the r_j sum to 1; 0 when the ids cover the vocabulary and the tail is
empty). Outside the top-k that is exp(log q_j - log q_tail) * (g_tail - sum(h) * q_tail), whose exp
never overflows since log q_j <= log q_tail there.
"""

import torch

# Log-prob of a tail with no vocabulary row left in it (k = V): finite so that its gradient stays
# finite; e^-10000 is 0 even in float64.
EMPTY_LOG_MASS = -1e4


def row_chunks(rows: int, chunk_tokens: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_tokens`` rows covering ``rows`` rows (one empty slice for
    none, so that an empty micro-batch still yields its empty results)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    return [slice(start, min(start + chunk_tokens, rows)) for start in range(0, max(rows, 1), chunk_tokens)]


def covers_vocabulary(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R] bool: the row's ids name every one of the ``vocab_size`` tokens, so its tail is empty."""
    ordered = ids.sort(dim=-1).values
    distinct = 1 + (ordered.diff(dim=-1) != 0).sum(dim=-1)
    return distinct == vocab_size


def _chunk_log_probs(logits: torch.Tensor, rows: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log_softmax(z / T) of the given rows over the first ``vocab_size`` columns: a new [C, V] float32 tensor."""
    chunk = logits[:, :vocab_size].index_select(0, rows).float()
    if temperature != 1.0:
        chunk.div_(temperature)
    return torch.log_softmax(chunk, dim=-1)


def logsumexp_in_place(values: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp over the last dim, computed in ``values``' own memory (which it overwrites)."""
    shift = values.amax(dim=-1, keepdim=True)
    shift.masked_fill_(shift.isinf(), 0)  # a row of -inf stays -inf, as in torch.logsumexp
    return values.sub_(shift).exp_().sum(dim=-1).log_().add_(shift.squeeze(-1))


class _StudentTopKLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, ids, vocab_size: int, temperature: float, chunk_tokens: int):
        k = ids.shape[-1]
        values = torch.empty((len(rows), k + 1), dtype=torch.float32, device=logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in row_chunks(len(rows), chunk_tokens):
                log_probs = _chunk_log_probs(logits, rows[chunk], vocab_size, temperature)
                values[chunk, :k] = log_probs.gather(-1, ids[chunk])
                values[chunk, k] = logsumexp_in_place(log_probs.scatter_(-1, ids[chunk], EMPTY_LOG_MASS))
                del log_probs  # else it lives on while the next chunk's are computed: one block more
        ctx.save_for_backward(logits, rows, ids, values)
        ctx.vocab_size, ctx.temperature, ctx.chunk_tokens = vocab_size, temperature, chunk_tokens
        return values

    @staticmethod
    def backward(ctx, grad_values):
        logits, rows, ids, values = ctx.saved_tensors
        k = ids.shape[-1]
        grad_logits = torch.zeros_like(logits)
        has_tail = ~covers_vocabulary(ids, ctx.vocab_size)
        # per-row factors of the closed form (module docstring), in float64: they are only [R, k + 1]
        grad_top = grad_values[:, :k]
        grad_tail = torch.where(has_tail, grad_values[:, k].double(), 0.0)
        grad_sum = grad_top.double().sum(dim=-1) + grad_tail
        # an empty tail's log-mass is EMPTY_LOG_MASS; shift by 0 there so that exp stays finite
        tail = torch.where(has_tail, values[:, k].double(), 0.0)
        outside_scale = (grad_tail - grad_sum * tail.exp()).float()
        top_share = (-grad_sum.unsqueeze(-1) * values[:, :k].double().exp()).float()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            for chunk in row_chunks(len(rows), ctx.chunk_tokens):
                log_probs = _chunk_log_probs(logits, rows[chunk], ctx.vocab_size, ctx.temperature)
                recomputed = log_probs.gather(-1, ids[chunk])
                if not torch.allclose(recomputed, values[chunk, :k], rtol=0, atol=0, equal_nan=True):
                    raise RuntimeError(
                        "the student's logits changed between the distillation loss's forward and backward "
                        "(an in-place write into the logits, e.g. an in-place cross-entropy backward that ran "
                        "first); the loss recomputes its log-softmax from them and would get a wrong gradient"
                    )
                grad = log_probs.sub_(tail[chunk].float().unsqueeze(-1)).exp_().mul_(outside_scale[chunk].unsqueeze(-1))
                # at the ids: -q_j sum(h) once, plus every g_i naming j (a repeated id adds up, as a gather's grad)
                grad.scatter_(-1, ids[chunk], top_share[chunk]).scatter_add_(-1, ids[chunk], grad_top[chunk])
                if ctx.temperature != 1.0:
                    grad.div_(ctx.temperature)
                grad_logits[:, : ctx.vocab_size].index_add_(0, rows[chunk], grad.to(grad_logits.dtype))
                del log_probs, grad  # as in forward
        return grad_logits, None, None, None, None, None


def student_topk_log_probs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probs over the teacher's top-k plus the tail, [R, k + 1] float32, and whether
    each row's ids cover the vocabulary (an empty tail; its value is then ``EMPTY_LOG_MASS`` + log V).

    ``logits`` [N, V_rows] in any float dtype; ``rows`` [R] picks the rows to score (all N when None),
    ``ids`` [R, k] the teacher's top-k ids there; ``vocab_size`` leaves out padded embedding columns.
    Differentiable with respect to ``logits``; at most ``chunk_tokens`` rows are processed at once.
    """
    if rows is None:
        rows = torch.arange(logits.shape[0], device=logits.device)
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    ids = ids.long()
    values = _StudentTopKLogProbs.apply(logits, rows.long(), ids, vocab_size, temperature, chunk_tokens)
    return values, covers_vocabulary(ids, vocab_size)
