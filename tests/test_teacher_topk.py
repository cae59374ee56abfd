"""The teacher's top-k carried from the reference pass: equal to the top-k of a direct teacher forward,
read by the distribution losses at the right rows, and small enough to ship.

The reference engine here is verl's own FSDP engine code (``prepare_model_inputs`` and
``prepare_model_outputs``) on an engine object with no process group, wrapped exactly as
verl-distill wraps the real one; the teacher is a tiny random Qwen2 whose embedding is padded
beyond the tokenizer's length, with the padded rows made the most likely ones.
"""

from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict

from verl.distill.divergences import reverse_kl_topk
from verl.distill.loss_config import DistillLossConfig
from verl.distill.teacher_topk import (
    CARRIED_FIELDS,
    TAIL_LOG_PROB_KEY,
    TOPK_IDS_KEY,
    TOPK_LOG_PROBS_KEY,
    bytes_per_response_token,
    carrying_teacher_topk,
    packed_response_rows,
)
from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.roles.utils.distribution_losses import (
    TOKEN_DIVERGENCE_KEY,
    TOPK_COVERAGE_KEY,
    forward_kl_topk_loss,
    jsd_topk_loss,
    reverse_kl_topk_loss,
)
from verl.workers.utils.padding import response_from_nested

TOKENIZER_SIZE = 23
EMBEDDING_ROWS = 32  # padded, as checkpoints pad to a multiple of 32, 64 or 128
PROMPT_LENGTHS = [3, 5, 2, 4]
RESPONSE_LENGTHS = [4, 1, 6, 3]
ROLLOUT_TEMPERATURE = 0.7
PADDED_ROW_BOOST = 30.0


@pytest.fixture(scope="module")
def teacher():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=EMBEDDING_ROWS,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    model = Qwen2ForCausalLM(config).eval()
    boost = torch.zeros(EMBEDDING_ROWS)
    boost[TOKENIZER_SIZE:] = PADDED_ROW_BOOST

    def logits_of(input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask).logits + boost

    return logits_of


def sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, TOKENIZER_SIZE, (prompt + response,), generator=generator)
        for prompt, response in zip(PROMPT_LENGTHS, RESPONSE_LENGTHS, strict=True)
    ]


def micro_batch(use_remove_padding: bool) -> TensorDict:
    tokens = sequences()
    data = TensorDict(
        {
            "input_ids": torch.nested.as_nested_tensor(tokens, layout=torch.jagged),
            "position_ids": torch.nested.as_nested_tensor([torch.arange(len(t)) for t in tokens], layout=torch.jagged),
            "response_mask": torch.nested.as_nested_tensor(
                [torch.ones(length, dtype=torch.int64) for length in RESPONSE_LENGTHS], layout=torch.jagged
            ),
        },
        batch_size=[len(tokens)],
    )
    tu.assign_non_tensor(data, use_remove_padding=use_remove_padding, temperature=ROLLOUT_TEMPERATURE)
    return data


def packed_teacher_logits(teacher) -> torch.Tensor:
    """The packed stream's logits, each sequence attending to itself only (flash-attention varlen's job)."""
    return torch.cat([teacher(tokens.unsqueeze(0))[0] for tokens in sequences()])


def reference_engine() -> FSDPEngineWithLMHead:
    """verl's FSDP engine class with only what its input/output preparation reads."""
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.pad_to_length = False
    engine.use_ulysses_sp = False
    return engine


def reference_pass(teacher, data: TensorDict, options: DistillLossConfig) -> dict:
    """One micro-batch of the reference pass, as the engine's ``forward_step`` runs it."""
    engine = reference_engine()
    prepare_model_outputs = carrying_teacher_topk(engine.prepare_model_outputs, options, TOKENIZER_SIZE)
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=data)
    if tu.get_non_tensor_data(data=data, key="use_remove_padding", default=True):
        logits = packed_teacher_logits(teacher).unsqueeze(0)
    else:
        logits = teacher(model_inputs["input_ids"], model_inputs["attention_mask"])
    return prepare_model_outputs(
        output=SimpleNamespace(logits=logits), output_args=output_args, micro_batch=data, logits_processor_func=None
    )


def direct_topk(teacher, k: int, temperature: float):
    """Per sequence: the teacher's own forward, log-softmax over the tokenizer's rows at the response
    positions, top-k by hand."""
    expected = []
    for tokens, response in zip(sequences(), RESPONSE_LENGTHS, strict=True):
        logits = teacher(tokens.unsqueeze(0))[0].double()
        start = len(tokens) - response - 1  # the logits at position t predict token t + 1
        log_probs = torch.log_softmax(logits[start : start + response, :TOKENIZER_SIZE] / temperature, dim=-1)
        order = torch.argsort(log_probs, dim=-1, descending=True)
        top_ids = order[:, :k]
        tail = torch.logsumexp(log_probs.gather(-1, order[:, k:]), dim=-1) if k < TOKENIZER_SIZE else None
        expected.append((top_ids, log_probs.gather(-1, top_ids), tail))
    return expected


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("distill_temperature", [1.0, 2.5])
def test_carried_topk_equals_the_topk_of_a_direct_teacher_forward(teacher, use_remove_padding, distill_temperature):
    k = 5
    options = DistillLossConfig(topk=k, temperature=distill_temperature)
    output = reference_pass(teacher, micro_batch(use_remove_padding), options)

    expected = direct_topk(teacher, k, ROLLOUT_TEMPERATURE * distill_temperature)
    carried = [output[key].unbind() for key in CARRIED_FIELDS]
    for (ids, log_probs, tail), (want_ids, want_log_probs, want_tail) in zip(zip(*carried), expected, strict=True):
        assert ids.dtype == torch.int32 and log_probs.dtype == torch.float32 and tail.dtype == torch.float32
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(log_probs.double(), want_log_probs, rtol=0, atol=1e-5)
        torch.testing.assert_close(tail.double(), want_tail, rtol=0, atol=1e-5)
        assert int(ids.max()) < TOKENIZER_SIZE  # the boosted padded rows never enter


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_carried_topk_does_not_depend_on_the_chunk_size(teacher, use_remove_padding):
    """1 row at a time, a chunk ending inside a sample, or one chunk for all 14 response rows: the same fields."""
    outputs = [
        reference_pass(
            teacher, micro_batch(use_remove_padding), DistillLossConfig(topk=5, temperature=1.5, logits_chunk_tokens=c)
        )
        for c in (1, 3, 1000)
    ]
    for output in outputs[:-1]:
        for key in CARRIED_FIELDS:
            assert torch.equal(output[key].values(), outputs[-1][key].values()), key


def test_reference_log_probs_and_carried_topk_share_the_response_layout(teacher):
    """verl's own reference log-prob of each sampled token (``ref_log_prob``) is found in the carried
    distribution at the same response position: the two layouts agree, with no off-by-one."""
    data = micro_batch(use_remove_padding=True)
    output = reference_pass(teacher, data, DistillLossConfig(topk=TOKENIZER_SIZE))
    ref_log_prob = response_from_nested(output["log_probs"], data["response_mask"]).values()

    sampled = torch.cat([tokens[-length:] for tokens, length in zip(sequences(), RESPONSE_LENGTHS, strict=True)])
    ids, log_probs = output[TOPK_IDS_KEY].values().long(), output[TOPK_LOG_PROBS_KEY].values()
    position_in_topk = (ids == sampled.unsqueeze(-1)).int().argmax(dim=-1, keepdim=True)
    carried_sampled = log_probs.gather(-1, position_in_topk).squeeze(-1)

    # verl normalises over every embedding row, the carried distribution over the tokenizer's rows only
    verl_log_probs = torch.log_softmax(packed_teacher_logits(teacher) / ROLLOUT_TEMPERATURE, dim=-1)
    tokenizer_log_mass = torch.nested.nested_tensor_from_jagged(
        torch.logsumexp(verl_log_probs[:, :TOKENIZER_SIZE], dim=-1), data["input_ids"].offsets()
    )
    renormalised = ref_log_prob - response_from_nested(tokenizer_log_mass, data["response_mask"]).values()
    torch.testing.assert_close(carried_sampled, renormalised, rtol=0, atol=1e-4)


def test_topk_of_the_whole_vocabulary_has_an_empty_tail(teacher):
    output = reference_pass(teacher, micro_batch(True), DistillLossConfig(topk=10 * EMBEDDING_ROWS))
    ids = output[TOPK_IDS_KEY].values()
    assert ids.shape[-1] == TOKENIZER_SIZE  # k is capped at the tokenizer, not the embedding
    assert torch.equal(ids.sort(dim=-1).values, torch.arange(TOKENIZER_SIZE, dtype=torch.int32).expand_as(ids))
    assert torch.isneginf(output[TAIL_LOG_PROB_KEY].values()).all()


def test_carried_fields_survive_the_batch_round_trip_and_cost_8k_plus_4_bytes_per_token(teacher):
    k = 32
    output = reference_pass(teacher, micro_batch(True), DistillLossConfig(topk=k))
    # TransferQueue stores one tensor per sample and re-nests them on the way out
    restored = {
        key: torch.nested.as_nested_tensor(list(output[key].unbind()), layout=torch.jagged) for key in CARRIED_FIELDS
    }
    tokens = sum(RESPONSE_LENGTHS)
    k_here = min(k, TOKENIZER_SIZE)
    carried = sum(restored[key].values().nbytes for key in CARRIED_FIELDS)
    assert carried == tokens * bytes_per_response_token(k_here)
    assert bytes_per_response_token(32) == 260
    assert bytes_per_response_token(151_936) == 1_215_492  # a full 152k-vocabulary row: ~1.2 MB per token
    for key in CARRIED_FIELDS:
        assert all(torch.equal(a, b) for a, b in zip(restored[key].unbind(), output[key].unbind(), strict=True))


def test_packed_response_rows_are_the_rows_verl_reads_reference_log_probs_from():
    data = micro_batch(True)
    row_numbers = torch.nested.nested_tensor_from_jagged(
        torch.arange(data["input_ids"].values().numel()), data["input_ids"].offsets()
    )
    verl_rows = response_from_nested(row_numbers, data["response_mask"]).values()
    assert torch.equal(packed_response_rows(data["input_ids"], data["response_mask"]), verl_rows)


# ------------------------------------------------------------- the actor's loss reads them


def actor_config(options: DistillLossConfig):
    return SimpleNamespace(distill=options, model_config=SimpleNamespace(tokenizer=[None] * TOKENIZER_SIZE))


def exact_divergence(name: str, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float):
    p, q = teacher_log_probs.exp(), student_log_probs.exp()
    forward = (p * (teacher_log_probs - student_log_probs)).sum(-1)
    reverse = (q * (student_log_probs - teacher_log_probs)).sum(-1)
    if name == "forward_kl_topk":
        return forward
    if name == "reverse_kl_topk":
        return reverse
    log_mixture = torch.log(beta * p + (1 - beta) * q)
    teacher_to_mixture = (p * (teacher_log_probs - log_mixture)).sum(-1)
    student_to_mixture = (q * (student_log_probs - log_mixture)).sum(-1)
    return (beta * teacher_to_mixture + (1 - beta) * student_to_mixture) / (beta * (1 - beta))


LOSSES = {"forward_kl_topk": forward_kl_topk_loss, "reverse_kl_topk": reverse_kl_topk_loss, "jsd_topk": jsd_topk_loss}


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_on_the_whole_vocabulary_equals_the_exact_divergence_at_every_response_row(teacher, name):
    distill_temperature = 1.5
    options = DistillLossConfig(topk=TOKENIZER_SIZE, temperature=distill_temperature, jsd_beta=0.3)
    data = micro_batch(True)
    data.update({key: value for key, value in reference_pass(teacher, data, options).items() if key in CARRIED_FIELDS})

    torch.manual_seed(2)
    packed_rows = data["input_ids"].values().numel()
    student_logits = torch.randn(1, packed_rows, EMBEDDING_ROWS) * 3  # already divided by the rollout temperature
    outputs = LOSSES[name](actor_config(options), data=data, student_logits=student_logits)

    rows = packed_response_rows(data["input_ids"], data["response_mask"])
    divergence = outputs[TOKEN_DIVERGENCE_KEY].squeeze(0)
    assert divergence.shape == (packed_rows,)
    prompt_rows = torch.ones(packed_rows, dtype=torch.bool).index_fill(0, rows, False)
    assert torch.all(divergence[prompt_rows] == 0)

    teacher_rows = packed_teacher_logits(teacher)[rows, :TOKENIZER_SIZE].double()
    teacher_log_probs = torch.log_softmax(teacher_rows / (ROLLOUT_TEMPERATURE * distill_temperature), dim=-1)
    student_log_probs = torch.log_softmax(
        student_logits[0, rows, :TOKENIZER_SIZE].double() / distill_temperature, dim=-1
    )
    exact = exact_divergence(name, student_log_probs, teacher_log_probs, beta=0.3)
    torch.testing.assert_close(divergence[rows].double(), exact, rtol=1e-4, atol=1e-5)
    assert torch.all(outputs[TOPK_COVERAGE_KEY].squeeze(0)[rows] == 1)


def test_loss_rows_get_their_own_carried_distribution(teacher):
    """Each response row of the packed student logits meets the carried top-k of its own position."""
    options = DistillLossConfig(topk=4)
    data = micro_batch(True)
    carried = reference_pass(teacher, data, options)
    data.update({key: carried[key] for key in CARRIED_FIELDS})
    torch.manual_seed(3)
    student_logits = torch.randn(1, data["input_ids"].values().numel(), EMBEDDING_ROWS, requires_grad=True)
    divergence = reverse_kl_topk_loss(actor_config(options), data=data, student_logits=student_logits)[
        TOKEN_DIVERGENCE_KEY
    ].squeeze(0)

    rows = packed_response_rows(data["input_ids"], data["response_mask"])
    expected = reverse_kl_topk(
        student_logits[0, rows, :TOKENIZER_SIZE],
        carried[TOPK_IDS_KEY].values(),
        carried[TOPK_LOG_PROBS_KEY].values(),
        teacher_tail_log_prob=carried[TAIL_LOG_PROB_KEY].values(),
    )
    torch.testing.assert_close(divergence[rows], expected)
    divergence.sum().backward()  # the gradient reaches the student's logits, and only at response rows
    prompt_rows = torch.ones(student_logits.shape[1], dtype=torch.bool).index_fill(0, rows, False)
    assert torch.all(student_logits.grad[0, prompt_rows] == 0)
    assert torch.all(student_logits.grad[0, rows, TOKENIZER_SIZE:] == 0)
    assert student_logits.grad[0, rows].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_values_and_gradients_do_not_depend_on_the_chunk_size(teacher, name, dtype):
    data = micro_batch(True)
    carried = reference_pass(teacher, data, DistillLossConfig(topk=4))
    data.update({key: carried[key] for key in CARRIED_FIELDS})
    torch.manual_seed(4)
    logits = (3 * torch.randn(1, data["input_ids"].values().numel(), EMBEDDING_ROWS)).to(dtype)
    results = []
    for chunk_tokens in (1, 5, 1000):
        student_logits = logits.clone().requires_grad_(True)
        options = DistillLossConfig(topk=4, temperature=1.5, logits_chunk_tokens=chunk_tokens)
        divergence = LOSSES[name](actor_config(options), data=data, student_logits=student_logits)[TOKEN_DIVERGENCE_KEY]
        divergence.sum().backward()
        results.append((divergence.detach(), student_logits.grad))
    for divergence, gradient in results[:-1]:
        assert torch.equal(divergence, results[-1][0])
        torch.testing.assert_close(gradient, results[-1][1], rtol=1e-6, atol=1e-6)


def test_loss_without_carried_fields_names_the_fix():
    data = micro_batch(True)
    student_logits = torch.randn(1, data["input_ids"].values().numel(), EMBEDDING_ROWS)
    with pytest.raises(RuntimeError, match="use_kl_loss=true"):
        forward_kl_topk_loss(actor_config(DistillLossConfig()), data=data, student_logits=student_logits)
