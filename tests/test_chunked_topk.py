"""The student's top-k + tail log-probs computed in chunks of rows (verl/distill/chunked_topk.py): the same
values and gradients as the straightforward unchunked autograd code for any chunk size, dtype,
temperature, padded vocabulary and subset of rows, and nothing vocabulary-sized kept for the backward."""

import math

import pytest
import torch

from verl.distill import divergences
from verl.distill.chunked_topk import EMPTY_LOG_MASS, row_chunks, student_topk_log_probs
from verl.distill.divergences import forward_kl_topk, jsd_topk, reverse_kl_topk, teacher_topk

PACKED_ROWS = 23
EMBEDDING_ROWS = 40  # the logits' width: the tokenizer's 37 tokens, padded
VOCAB = 37
RESPONSE_ROWS = torch.tensor([2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20])  # prompt rows left out


def plain_student_topk(logits, ids, rows, vocab_size, temperature):
    """The straightforward code: log-softmax of the picked rows, gather, masked logsumexp for the tail."""
    log_probs = torch.log_softmax(logits[rows, :vocab_size].float() / temperature, dim=-1)
    in_topk = torch.zeros_like(log_probs, dtype=torch.bool).scatter(-1, ids, True)
    tail = torch.logsumexp(log_probs.masked_fill(in_topk, EMPTY_LOG_MASS), dim=-1, keepdim=True)
    return torch.cat([log_probs.gather(-1, ids), tail], dim=-1)


def inputs(dtype, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(PACKED_ROWS, EMBEDDING_ROWS, generator=generator)).to(dtype)
    logits[:, VOCAB:] = 30.0  # padded columns made the most likely: they must not count
    teacher = torch.randn(len(RESPONSE_ROWS), VOCAB, generator=generator)
    return logits, teacher_topk(teacher, k)


def values_and_gradient(compute, logits, upstream):
    leaf = logits.clone().requires_grad_(True)
    values = compute(leaf)
    (values * upstream).sum().backward()
    return values.detach(), leaf.grad


def tolerances(dtype):
    # bf16 gradients are rounded to bf16 at the end: one bf16 ulp of the largest entries
    return dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000], ids=["row-by-row", "several", "one-chunk"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("k", [5, VOCAB], ids=["tail", "whole-vocabulary"])
def test_values_and_gradients_equal_the_unchunked_computation(dtype, chunk_tokens, temperature, k):
    logits, top = inputs(dtype, k)
    upstream = torch.randn(len(RESPONSE_ROWS), k + 1, generator=torch.Generator().manual_seed(1))

    def chunked(leaf):
        values, _ = student_topk_log_probs(
            leaf, top.ids, rows=RESPONSE_ROWS, vocab_size=VOCAB, temperature=temperature, chunk_tokens=chunk_tokens
        )
        return values

    values, gradient = values_and_gradient(chunked, logits, upstream)
    want_values, want_gradient = values_and_gradient(
        lambda leaf: plain_student_topk(leaf, top.ids, RESPONSE_ROWS, VOCAB, temperature), logits, upstream
    )
    assert values.dtype == torch.float32 and gradient.dtype == dtype
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    torch.testing.assert_close(gradient.float(), want_gradient.float(), **tolerances(dtype))
    prompt_rows = torch.ones(PACKED_ROWS, dtype=torch.bool).index_fill(0, RESPONSE_ROWS, False)
    assert torch.all(gradient[prompt_rows] == 0) and torch.all(gradient[:, VOCAB:] == 0)
    assert gradient[RESPONSE_ROWS, :VOCAB].abs().sum() > 0


def test_repeated_ids_add_up_as_a_gather_does():
    logits, _ = inputs(torch.float32, 3)
    ids = torch.tensor([[4, 4, 7]]).expand(len(RESPONSE_ROWS), 3).contiguous()
    upstream = torch.randn(len(RESPONSE_ROWS), 4, generator=torch.Generator().manual_seed(2))
    got = values_and_gradient(
        lambda leaf: student_topk_log_probs(leaf, ids, rows=RESPONSE_ROWS, vocab_size=VOCAB, chunk_tokens=3)[0],
        logits,
        upstream,
    )
    want = values_and_gradient(lambda leaf: plain_student_topk(leaf, ids, RESPONSE_ROWS, VOCAB, 1.0), logits, upstream)
    for ours, plain in zip(got, want, strict=True):
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss", [forward_kl_topk, reverse_kl_topk, jsd_topk], ids=lambda loss: loss.__name__)
@pytest.mark.parametrize("k", [5, VOCAB], ids=["tail", "whole-vocabulary"])
def test_each_loss_and_its_gradient_equal_the_unchunked_loss(monkeypatch, dtype, loss, k):
    logits, top = inputs(dtype, k, seed=3)
    kwargs = dict(teacher_tail_log_prob=top.tail_log_prob, temperature=1.3, rows=RESPONSE_ROWS, valid_vocab_size=VOCAB)
    weights = torch.rand(len(RESPONSE_ROWS), generator=torch.Generator().manual_seed(4))  # e.g. a token-mean's

    def chunked(leaf):
        return loss(leaf, top.ids, top.log_probs, chunk_tokens=2, **kwargs)

    values, gradient = values_and_gradient(chunked, logits, weights)

    def plain(logits, ids, *, rows, vocab_size, temperature, chunk_tokens):
        covered = torch.zeros(len(rows), dtype=torch.bool) if k < VOCAB else torch.ones(len(rows), dtype=torch.bool)
        return plain_student_topk(logits, ids, rows, vocab_size, temperature), covered

    monkeypatch.setattr(divergences, "student_topk_log_probs", plain)
    want_values, want_gradient = values_and_gradient(chunked, logits, weights)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    torch.testing.assert_close(gradient.float(), want_gradient.float(), **tolerances(dtype))
    assert torch.all(values > 0)


def test_nothing_vocabulary_sized_is_kept_for_the_backward_but_a_reference_to_the_logits():
    logits, top = inputs(torch.float32, 5)
    leaf = logits.clone().requires_grad_(True)
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = reverse_kl_topk(
            leaf, top.ids, top.log_probs, teacher_tail_log_prob=top.tail_log_prob, rows=RESPONSE_ROWS,
            valid_vocab_size=VOCAB, chunk_tokens=4,
        )  # fmt: skip
    vocabulary_sized = [tensor for tensor in saved if tensor.shape[-1] >= VOCAB]
    assert len(vocabulary_sized) == 1 and vocabulary_sized[0] is leaf
    assert all(tensor.numel() <= len(RESPONSE_ROWS) * (5 + 1) for tensor in saved if tensor is not leaf)
    # the straightforward code keeps the log-softmax, the masked copy and the mask: all [rows, V]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        plain_student_topk(leaf, top.ids, RESPONSE_ROWS, VOCAB, 1.0)
    assert sum(tensor.shape[-1] == VOCAB and tensor.shape[0] == len(RESPONSE_ROWS) for tensor in saved) >= 3
    loss.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_logits_changed_in_place_before_the_backward_are_refused():
    """The backward recomputes the log-softmax from the logits: a write into them that autograd does not
    see (like flash-attn's in-place cross-entropy backward, a kernel writing through the pointer, if it
    ran first) would give a wrong gradient, so it stops instead. A write autograd sees is refused by
    autograd itself."""
    logits, top = inputs(torch.float32, 5)
    leaf = logits.clone().requires_grad_(True)
    scaled = leaf * 1.0  # a non-leaf, as the engine's temperature-scaled logits
    values, _ = student_topk_log_probs(scaled, top.ids, rows=RESPONSE_ROWS, vocab_size=VOCAB, chunk_tokens=4)
    scaled.data[RESPONSE_ROWS[5], 0] += 3.0  # .data: no version bump, as a raw kernel write
    with pytest.raises(RuntimeError, match="logits changed between the distillation loss's forward and backward"):
        values.sum().backward()


def test_a_micro_batch_without_response_tokens_gives_empty_values_and_a_zero_gradient():
    logits, top = inputs(torch.float32, 5)
    leaf = logits.clone().requires_grad_(True)
    values, covered = student_topk_log_probs(
        leaf, top.ids[:0], rows=RESPONSE_ROWS[:0], vocab_size=VOCAB, chunk_tokens=4
    )
    assert values.shape == (0, 6) and covered.shape == (0,)
    values.sum().backward()
    assert torch.all(leaf.grad == 0)


def test_an_empty_tail_has_the_empty_log_mass_and_is_reported_covered():
    logits, top = inputs(torch.float32, VOCAB)
    values, covered = student_topk_log_probs(logits, top.ids, rows=RESPONSE_ROWS, vocab_size=VOCAB, chunk_tokens=4)
    assert covered.all()
    torch.testing.assert_close(values[:, -1], torch.full((len(RESPONSE_ROWS),), EMPTY_LOG_MASS + math.log(VOCAB)))


def test_row_chunks_cover_every_row_once_and_reject_a_zero_size():
    assert row_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert row_chunks(3, 64) == [slice(0, 3)]
    assert row_chunks(0, 64) == [slice(0, 0)]
    with pytest.raises(ValueError, match="chunk_tokens=0 must be >= 1"):
        row_chunks(5, 0)
