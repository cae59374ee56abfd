"""The CPU backend's block-wise log-probs equal verl's row-by-row fallback, values and gradients."""

import pytest
import torch

from verl.distill import token_log_probs as module
from verl.distill.token_log_probs import token_log_probs
from verl.utils.torch_functional import logprobs_from_logits_v2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("elements_per_block", [1 << 24, 100])  # one block; blocks of two rows of 47
def test_matches_verl_row_by_row(monkeypatch, dtype, elements_per_block):
    monkeypatch.setattr(module, "ELEMENTS_PER_BLOCK", elements_per_block)
    torch.manual_seed(0)
    logits = (4 * torch.randn(37, 47)).to(dtype)
    labels = torch.randint(0, 47, (37,))
    ours_input = logits.clone().requires_grad_()
    verl_input = logits.clone().requires_grad_()
    weights = torch.randn(37).to(dtype)

    ours = token_log_probs(ours_input, labels)
    reference = logprobs_from_logits_v2(verl_input, labels)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()

    assert ours.dtype == reference.dtype and ours.shape == (37,)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(ours_input.grad, verl_input.grad, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_keeps_leading_dimensions_and_handles_no_rows():
    logits = torch.randn(2, 3, 5)
    labels = torch.randint(0, 5, (2, 3))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_log_probs(logits, labels), expected)
    assert token_log_probs(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_cpu_engine_uses_it():
    import verl.distill.plugin  # noqa: F401
    from verl.distill.cpu_job import cpu_platform_active

    if not cpu_platform_active():
        pytest.fail("these tests run on the CPU backend")
    import verl.workers.engine.fsdp.transformer_impl as fsdp_engine

    assert fsdp_engine.logprobs_from_logits is token_log_probs
