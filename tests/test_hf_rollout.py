"""The ``hf`` rollout backend: sampled tokens, their log-probs, stopping, batching and weight sync.

A tiny random Qwen2 (vocab 64) and a word-level tokenizer are built in a temporary directory;
log-probs are checked against a direct transformers forward pass over prompt + response.
"""

import asyncio
import math
import threading

import pytest
import ray
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from verl.distill import hf_rollout
from verl.distill.hf_rollout import (
    Decoded,
    HFReplica,
    HFRolloutServer,
    HFServerAdapter,
    SamplingSettings,
    decode,
    eos_token_ids,
    prompt_log_probs,
    resolve_sampling,
    sampling_log_probs,
)
from verl.distill.request_batching import RequestAborted, RequestBatcher
from verl.distill.rollout_weights import load_adapters, load_base_weights, load_full_state_dict
from verl.workers.config import HFModelConfig, RolloutConfig

VOCAB = 64
EOS_ID = 1
EOS_TOKEN = "<eos>"
PROMPT = [5, 17, 42, 8, 30, 2]
# prompts of different lengths, for left-padded batches
PROMPTS = [PROMPT, [9, 3], [7, 7, 11, 12, 13, 14, 15, 16, 50], [44]]


def tiny_qwen2(seed: int, tie_word_embeddings: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=EOS_ID,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).eval()
    # random init gives near-uniform logits; scale the head so sampling is visibly non-uniform
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_qwen2(seed=0).save_pretrained(path)
    vocab = {"<pad>": 0, EOS_TOKEN: EOS_ID, **{f"w{i}": i for i in range(2, VOCAB)}}
    word_level = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS_TOKEN, pad_token="<pad>").save_pretrained(
        path
    )
    return str(path)


@pytest.fixture(scope="module")
def policy(model_dir):
    return Qwen2ForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()


def settings(**overrides) -> SamplingSettings:
    values = dict(
        temperature=1.0, top_k=-1, top_p=1.0, greedy=False, max_tokens=12, return_log_probs=True, ignore_eos=True
    )
    values.update(overrides)
    return SamplingSettings(**values)


@torch.no_grad()
def forward_log_probs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token, from one forward pass over prompt + response."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    step_logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)] / temperature
    return torch.log_softmax(step_logits, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]


@torch.no_grad()
def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def decode_one(model, prompt, row_settings, eos, generator, should_abort=lambda: False) -> Decoded:
    return decode(model, [prompt], [row_settings], eos, generator, should_abort)[0]


# --- the decoding core (no Ray) ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_log_probs_match_a_forward_pass(policy, temperature):
    decoded = decode_one(
        policy, PROMPT, settings(temperature=temperature), frozenset(), torch.Generator().manual_seed(3)
    )
    assert len(decoded.token_ids) == 12 and not decoded.aborted
    assert len(set(decoded.token_ids)) > 1
    expected = forward_log_probs(policy, PROMPT, decoded.token_ids, temperature)
    torch.testing.assert_close(torch.tensor(decoded.log_probs), expected, atol=1e-4, rtol=0)


def test_sampling_follows_the_temperature_scaled_distribution(policy):
    """The empirical first-token frequencies match softmax(logits / T)."""
    temperature = 1.5
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    probs = torch.softmax(logits / temperature, dim=-1)
    generator = torch.Generator().manual_seed(0)
    draws = 3000
    counts = torch.zeros(VOCAB)
    log_probs = sampling_log_probs(logits, settings(temperature=temperature))
    for token in torch.multinomial(log_probs.exp(), draws, replacement=True, generator=generator):
        counts[token] += 1
    assert (counts / draws - probs).abs().max() < 0.04


def test_top_k_restricts_and_renormalises(policy):
    temperature, top_k = 0.8, 5
    decoded = decode_one(
        policy, PROMPT, settings(temperature=temperature, top_k=top_k), frozenset(), torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([PROMPT + decoded.token_ids])).logits[0].float() / temperature
    for step, token in enumerate(decoded.token_ids):
        step_logits = logits[len(PROMPT) - 1 + step]
        top_values, top_ids = torch.topk(step_logits, top_k)
        assert token in top_ids.tolist()
        expected = step_logits[token] - torch.logsumexp(top_values, dim=0)
        assert decoded.log_probs[step] == pytest.approx(float(expected), abs=1e-4)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    log_probs = sampling_log_probs(logits, settings(top_p=0.75))
    assert log_probs.exp().tolist() == pytest.approx([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8], abs=1e-6)
    # the most likely token survives even when it alone exceeds top_p
    assert sampling_log_probs(logits, settings(top_p=0.1)).exp().tolist() == pytest.approx([0, 1, 0, 0], abs=1e-6)


def test_greedy_takes_the_argmax_and_reports_unscaled_log_probs(policy):
    decoded = decode_one(policy, PROMPT, settings(temperature=0.0, greedy=True), frozenset(), torch.Generator())
    assert decoded.token_ids == greedy_reference(policy, PROMPT, 12)
    expected = forward_log_probs(policy, PROMPT, decoded.token_ids, temperature=1.0)
    torch.testing.assert_close(torch.tensor(decoded.log_probs), expected, atol=1e-4, rtol=0)


def test_stops_after_the_first_eos_and_ignore_eos_continues(policy):
    free_run = greedy_reference(policy, PROMPT, 12)
    stop_at = next(i for i in range(2, 12) if free_run[i] not in free_run[:i])
    eos = frozenset({free_run[stop_at]})
    greedy = dict(temperature=0.0, greedy=True)

    stopped = decode_one(policy, PROMPT, settings(**greedy, ignore_eos=False), eos, torch.Generator())
    assert stopped.token_ids == free_run[: stop_at + 1]
    assert len(stopped.log_probs) == stop_at + 1

    ignored = decode_one(policy, PROMPT, settings(**greedy, ignore_eos=True), eos, torch.Generator())
    assert ignored.token_ids == free_run


def test_abort_returns_the_tokens_so_far(policy):
    polls = []

    def abort_on_fourth_poll():
        polls.append(1)
        return len(polls) > 3

    decoded = decode_one(
        policy, PROMPT, settings(), frozenset(), torch.Generator().manual_seed(0), abort_on_fourth_poll
    )
    assert decoded.aborted and len(decoded.token_ids) == 3 == len(decoded.log_probs)


# --- batches of prompts -----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_left_padded_batch_log_probs_match_a_forward_pass_of_each_prompt(policy, temperature):
    budgets = [12, 5, 9, 7]
    rows = [settings(temperature=temperature, max_tokens=budget) for budget in budgets]
    decoded = decode(policy, PROMPTS, rows, frozenset(), torch.Generator().manual_seed(3))
    assert [len(row.token_ids) for row in decoded] == budgets
    for prompt, row in zip(PROMPTS, decoded):
        assert not row.aborted and len(set(row.token_ids)) > 1
        expected = forward_log_probs(policy, prompt, row.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(row.log_probs), expected, atol=1e-4, rtol=0)


def test_batched_greedy_rows_stop_at_their_own_eos_or_budget(policy):
    """Each row of a batch decodes exactly what it would decode alone, and stops on its own."""
    free_runs = [greedy_reference(policy, prompt, 10) for prompt in PROMPTS]
    # an EOS that the first prompt's greedy continuation reaches after a few tokens
    stop_at = next(i for i in range(2, 10) if free_runs[0][i] not in free_runs[0][:i])
    eos = frozenset({free_runs[0][stop_at]})
    greedy = dict(temperature=0.0, greedy=True)
    rows = [
        settings(**greedy, max_tokens=10, ignore_eos=False),
        settings(**greedy, max_tokens=3, ignore_eos=False),
        settings(**greedy, max_tokens=10, ignore_eos=True),
        settings(**greedy, max_tokens=10, ignore_eos=False),
    ]
    decoded = decode(policy, PROMPTS, rows, eos, torch.Generator())
    alone = [decode_one(policy, prompt, row, eos, torch.Generator()) for prompt, row in zip(PROMPTS, rows)]
    assert [row.token_ids for row in decoded] == [row.token_ids for row in alone]
    assert decoded[0].token_ids == free_runs[0][: stop_at + 1]
    assert decoded[1].token_ids == free_runs[1][: len(decoded[1].token_ids)] and len(decoded[1].token_ids) <= 3
    assert decoded[2].token_ids == free_runs[2]
    for batched, single, prompt in zip(decoded, alone, PROMPTS):
        torch.testing.assert_close(torch.tensor(batched.log_probs), torch.tensor(single.log_probs), atol=1e-5, rtol=0)
        expected = forward_log_probs(policy, prompt, batched.token_ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(batched.log_probs), expected, atol=1e-4, rtol=0)


def test_abort_keeps_finished_rows_and_cuts_the_others(policy):
    polls = []

    def abort_on_fourth_poll():
        polls.append(1)
        return len(polls) > 3

    rows = [settings(max_tokens=2), settings(max_tokens=10)]
    short, long = decode(policy, PROMPTS[:2], rows, frozenset(), torch.Generator().manual_seed(0), abort_on_fourth_poll)
    assert not short.aborted and len(short.token_ids) == 2
    assert long.aborted and len(long.token_ids) == 3 == len(long.log_probs)


def test_a_batch_shares_one_sampling_distribution(policy):
    with pytest.raises(ValueError, match="one distribution"):
        decode(policy, PROMPTS[:2], [settings(), settings(top_k=5)], frozenset(), torch.Generator())
    # budgets, EOS handling and log-prob requests may differ within a batch
    assert settings(max_tokens=3, ignore_eos=False).distribution == settings(return_log_probs=False).distribution


def test_row_wise_sampling_log_probs_equal_single_rows():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    for row_settings in [settings(temperature=0.7, top_k=6), settings(top_p=0.6), settings(top_k=10, top_p=0.8)]:
        batched = sampling_log_probs(logits, row_settings)
        singles = torch.stack([sampling_log_probs(row, row_settings) for row in logits])
        assert torch.equal(batched, singles)


# --- request parameters -----------------------------------------------------------------------


def rollout_config(**overrides) -> RolloutConfig:
    values = dict(name="hf", tensor_model_parallel_size=1, prompt_length=16, response_length=8)
    values.update(overrides)
    return RolloutConfig(**values)


def test_token_budget_follows_verl_defaults_and_request_limits():
    config = rollout_config()
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    assert resolve_sampling(params, config, prompt_len=6, max_model_len=128).max_tokens == 8
    # a long prompt only gets what is left of prompt_length + response_length
    assert resolve_sampling(params, config, prompt_len=20, max_model_len=128).max_tokens == 4
    assert resolve_sampling({**params, "max_tokens": 3}, config, prompt_len=6, max_model_len=128).max_tokens == 3
    assert resolve_sampling({"max_new_tokens": 5}, config, prompt_len=6, max_model_len=128).max_tokens == 5
    # never beyond the model's context
    assert resolve_sampling({"max_tokens": 50}, config, prompt_len=6, max_model_len=10).max_tokens == 4
    with pytest.raises(ValueError, match="max_model_len"):
        resolve_sampling(params, config, prompt_len=10, max_model_len=10)


def test_greedy_when_temperature_zero_or_sampling_disabled():
    config = rollout_config()
    assert resolve_sampling({"temperature": 0}, config, 6, 128).greedy
    assert resolve_sampling({"temperature": 1.0, "do_sample": False}, config, 6, 128).greedy
    assert not resolve_sampling({"temperature": 1.0}, config, 6, 128).greedy


@pytest.mark.parametrize(
    "params, message",
    [
        ({"prompt_logprobs": 2}, "prompt_logprobs=2"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_unsupported_requests_fail_with_the_offending_key(params, message):
    with pytest.raises(ValueError, match=message):
        resolve_sampling(params, rollout_config(), 6, 128)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_prompt_log_probs_of_a_padded_batch_match_a_forward_pass_of_each_sequence(policy, temperature):
    scored = prompt_log_probs(policy, PROMPTS, settings(temperature=temperature))
    for sequence, log_probs in zip(PROMPTS, scored, strict=True):
        expected = forward_log_probs(policy, sequence[:1], sequence[1:], temperature)
        assert len(log_probs) == len(sequence) - 1
        torch.testing.assert_close(torch.tensor(log_probs), expected, atol=1e-4, rtol=0)


def test_a_prompt_logprobs_request_is_scored_apart_from_generation_and_may_fill_the_context():
    config = rollout_config()
    request = {"prompt_logprobs": 0, "max_tokens": 1, "temperature": 0.6}
    scoring = resolve_sampling(request, config, prompt_len=10, max_model_len=10)
    generating = resolve_sampling({"temperature": 0.6}, config, 6, 128)
    assert scoring.score_prompt and not generating.score_prompt
    assert scoring.distribution != generating.distribution
    assert resolve_sampling({"prompt_logprobs": None}, config, 6, 128) == resolve_sampling({}, config, 6, 128)


def test_eos_ids_come_from_tokenizer_and_generation_config(model_dir):
    model_config = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"})
    assert eos_token_ids(model_config) == {EOS_ID}


def test_weight_loading_accepts_tied_weights_and_rejects_partial_updates():
    tied = tiny_qwen2(seed=0, tie_word_embeddings=True)
    source = tiny_qwen2(seed=1, tie_word_embeddings=True).state_dict()
    load_full_state_dict(tied, {k: v for k, v in source.items() if k != "lm_head.weight"})
    torch.testing.assert_close(tied.lm_head.weight, source["model.embed_tokens.weight"])

    untied = tiny_qwen2(seed=0)
    with pytest.raises(ValueError, match="missing: \\['lm_head.weight'\\]"):
        load_full_state_dict(untied, {k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="unknown: \\['extra.weight'\\]"):
        load_full_state_dict(untied, {**untied.state_dict(), "extra.weight": torch.zeros(1)})


# --- a LoRA actor's updates (verl.distill.rollout_weights) -------------------------------------


def lora_actor(seed: int = 3):
    """A PEFT model as verl's FSDP engine builds one (rank 4, all linear layers), with non-zero adapters."""
    from peft import LoraConfig, get_peft_model

    actor = get_peft_model(
        tiny_qwen2(seed=0), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in actor.named_parameters():
            if "lora_B" in name:  # zero at initialisation: the adapters would change nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return actor.eval()


def adapter_update(actor):
    """What verl sends after an update without lora.merge: the adapters and the LoRA config."""
    from peft import get_peft_model_state_dict

    return actor.peft_config["default"].to_dict(), get_peft_model_state_dict(actor)


def base_update(actor):
    """What verl sends once before the first adapters (rollout.load_format=dummy): the base weights,
    each adapted module's weight under ``<module>.base_layer.weight`` (verl's replace_lora_wrapper)."""
    from verl.utils.fsdp_utils import replace_lora_wrapper

    config = actor.peft_config["default"]
    base = actor.get_base_model().state_dict()
    return {
        replace_lora_wrapper(name.replace(".base_layer", ""), config): tensor
        for name, tensor in base.items()
        if "lora_" not in name
    }


def test_adapters_from_the_actor_make_the_rollout_compute_what_the_actor_computes():
    actor = lora_actor()
    peft_config, weights = adapter_update(actor)
    assert all("lora_" in name for name in weights)
    rollout = load_adapters(tiny_qwen2(seed=0), peft_config, weights)
    greedy = settings(greedy=True, max_tokens=6)
    decoded = decode_one(rollout, PROMPT, greedy, frozenset({EOS_ID}), torch.Generator())
    assert decoded.token_ids == greedy_reference(actor, PROMPT, 6)
    assert decoded.token_ids != greedy_reference(tiny_qwen2(seed=0), PROMPT, 6)  # the adapters matter
    expected = forward_log_probs(actor, PROMPT, decoded.token_ids, temperature=1.0)
    torch.testing.assert_close(torch.tensor(decoded.log_probs), expected, atol=1e-4, rtol=0)

    # the next update replaces the adapters in place
    newer = lora_actor(seed=4)
    rollout = load_adapters(rollout, *adapter_update(newer))
    assert greedy_reference(rollout, PROMPT, 6) == greedy_reference(newer, PROMPT, 6)


def test_base_weights_load_with_or_without_adapters_in_place():
    actor = lora_actor()
    base = {name: tensor + 0.5 for name, tensor in base_update(actor).items()}
    assert any(".base_layer." in name for name in base)
    plain = tiny_qwen2(seed=0)
    load_base_weights(plain, base)
    torch.testing.assert_close(
        plain.model.layers[0].self_attn.q_proj.weight, base["model.layers.0.self_attn.q_proj.base_layer.weight"]
    )
    wrapped = load_adapters(tiny_qwen2(seed=0), *adapter_update(actor))
    load_base_weights(wrapped, base)
    torch.testing.assert_close(
        wrapped.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
        base["model.layers.0.self_attn.q_proj.base_layer.weight"],
    )
    torch.testing.assert_close(wrapped.get_base_model().model.embed_tokens.weight, base["model.embed_tokens.weight"])


def test_a_partial_lora_update_is_refused():
    actor = lora_actor()
    peft_config, weights = adapter_update(actor)
    dropped = sorted(weights)[0]
    with pytest.raises(ValueError, match="LoRA update does not match the rollout's adapters .*missing"):
        load_adapters(tiny_qwen2(seed=0), peft_config, {k: v for k, v in weights.items() if k != dropped})
    base = base_update(actor)
    with pytest.raises(ValueError, match="missing: \\['model.embed_tokens.weight'\\]"):
        load_base_weights(tiny_qwen2(seed=0), {k: v for k, v in base.items() if k != "model.embed_tokens.weight"})


# --- the request queue (no model) -------------------------------------------------------------


class RecordingBatches:
    """A batch function that records its batches; ``hold`` blocks a batch until released."""

    def __init__(self, hold: bool = False):
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.stopped_early: list[bool] = []

    def __call__(self, requests, should_stop):
        self.batches.append(list(requests))
        self.started.set()
        self.release.wait(timeout=10)
        self.stopped_early.append(should_stop())
        return [f"done {request}" for request in requests]


async def test_concurrent_requests_are_batched_by_key_in_arrival_order_up_to_the_cap():
    run = RecordingBatches()
    batcher = RequestBatcher(run, batch_key=lambda request: request[0], max_batch_size=3)
    requests = ["a0", "a1", "b2", "a3", "a4", "a5", "a6"]
    results = await asyncio.gather(*(batcher.submit(request) for request in requests))
    assert results == [f"done {request}" for request in requests]
    # the oldest request leads each batch; compatible later ones join it up to the cap
    assert run.batches == [["a0", "a1", "a3"], ["b2"], ["a4", "a5", "a6"]]


async def test_a_failing_batch_fails_its_requests_and_the_queue_goes_on():
    def fail_on_b(requests, should_stop):
        if requests[0] == "b":
            raise RuntimeError("broken batch")
        return requests

    batcher = RequestBatcher(fail_on_b, batch_key=lambda request: request, max_batch_size=8)
    outcomes = await asyncio.gather(batcher.submit("b"), batcher.submit("b"), return_exceptions=True)
    assert [str(outcome) for outcome in outcomes] == ["broken batch"] * 2
    assert await batcher.submit("a") == "a"


async def test_exclusive_waits_for_the_running_batch_and_holds_back_the_next():
    run = RecordingBatches(hold=True)
    batcher = RequestBatcher(run, batch_key=lambda request: 0, max_batch_size=8)
    first = asyncio.create_task(batcher.submit("first"))
    await asyncio.to_thread(run.started.wait, 10)
    events = []

    async def exclusive_section():
        async with batcher.exclusive():
            events.append(("exclusive", len(run.batches)))

    section = asyncio.create_task(exclusive_section())
    second = asyncio.create_task(batcher.submit("second"))
    await asyncio.sleep(0.05)
    assert not section.done() and not first.done()
    run.release.set()
    assert await first == "done first" and await second == "done second"
    await section
    # the exclusive block ran after the first batch and before the second one
    assert events == [("exclusive", 1)] and run.batches == [["first"], ["second"]]


async def test_abort_fails_queued_requests_and_stops_the_running_batch():
    run = RecordingBatches(hold=True)
    batcher = RequestBatcher(run, batch_key=lambda request: request, max_batch_size=8)
    running = asyncio.create_task(batcher.submit("running"))
    await asyncio.to_thread(run.started.wait, 10)
    queued = asyncio.create_task(batcher.submit("queued"))
    await asyncio.sleep(0)
    abort = asyncio.create_task(batcher.abort())
    with pytest.raises(RequestAborted):
        await queued
    await asyncio.sleep(0.05)
    assert not abort.done()  # abort returns only once the running batch is over
    run.release.set()
    await abort
    assert await running == "done running" and run.stopped_early == [True]
    assert await batcher.submit("after") == "done after" and run.stopped_early == [True, False]


# --- the server without Ray -------------------------------------------------------------------


def in_process_server(model_dir, **config) -> HFRolloutServer:
    model_config = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"})
    return HFRolloutServer(config=rollout_config(**config), model_config=model_config, replica_rank=0)


def greedy_params(max_tokens=10):
    return {"temperature": 0.0, "logprobs": True, "ignore_eos": True, "max_tokens": max_tokens}


async def test_concurrent_generate_calls_are_decoded_in_one_batch(model_dir, policy, monkeypatch):
    batch_sizes = []

    def recording_decode(model, prompts, *args):
        batch_sizes.append(len(prompts))
        return decode(model, prompts, *args)

    monkeypatch.setattr(hf_rollout, "decode", recording_decode)
    server = in_process_server(model_dir)
    outputs = await asyncio.gather(
        *(server.generate(prompt, greedy_params(), request_id=str(i)) for i, prompt in enumerate(PROMPTS))
    )
    assert batch_sizes == [len(PROMPTS)]
    for prompt, output in zip(PROMPTS, outputs):
        assert output.token_ids == greedy_reference(policy, prompt, 10) and output.stop_reason == "completed"
        expected = forward_log_probs(policy, prompt, output.token_ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(output.log_probs), expected, atol=1e-4, rtol=0)

    batch_sizes.clear()
    capped = in_process_server(model_dir, max_num_seqs=3)
    await asyncio.gather(*(capped.generate(prompt, greedy_params(), request_id="r") for prompt in PROMPTS))
    assert batch_sizes == [3, 1]


async def test_prompt_logprobs_requests_are_answered_in_verls_vllm_layout_next_to_generation(model_dir, policy):
    """Row t holds token t + 1 and its log-prob, a zero row pads the end (verl's extract_prompt_logprobs);
    a generation request sent at the same time is decoded as usual."""
    server = in_process_server(model_dir)
    score = {"prompt_logprobs": 0, "max_tokens": 1, "temperature": 0.6}
    scored, generated = await asyncio.gather(
        server.generate(PROMPT, score, request_id="score"), server.generate(PROMPT, greedy_params(), request_id="gen")
    )
    assert scored.token_ids == [] and scored.stop_reason == "completed"
    assert scored.extra_fields["prompt_ids"] == [[token] for token in PROMPT[1:]] + [[0]]
    rows = scored.extra_fields["prompt_logprobs"]
    assert len(rows) == len(PROMPT) and rows[-1] == [0.0]
    expected = forward_log_probs(policy, PROMPT[:1], PROMPT[1:], temperature=0.6)
    torch.testing.assert_close(torch.tensor([row[0] for row in rows[:-1]]), expected, atol=1e-4, rtol=0)
    assert generated.token_ids == greedy_reference(policy, PROMPT, 10)


async def test_a_weight_update_waits_for_the_running_batch(model_dir, policy, monkeypatch):
    """The running batch finishes with the old weights; requests queued behind the update get the new ones."""
    started, release = threading.Event(), threading.Event()

    def held_decode(*args):
        started.set()
        release.wait(timeout=10)
        return decode(*args)

    monkeypatch.setattr(hf_rollout, "decode", held_decode)
    server = in_process_server(model_dir)
    new_policy = tiny_qwen2(seed=7)
    running = asyncio.create_task(server.generate(PROMPT, greedy_params(), request_id="running"))
    await asyncio.to_thread(started.wait, 10)
    update = asyncio.create_task(server.update_weights(new_policy.state_dict(), global_steps=3))
    queued = asyncio.create_task(server.generate(PROMPT, greedy_params(), request_id="queued"))
    await asyncio.sleep(0.05)
    assert not update.done()
    release.set()
    old, new = await running, await queued
    await update
    assert old.token_ids == greedy_reference(policy, PROMPT, 10) and old.extra_fields["global_steps"] is None
    assert new.token_ids == greedy_reference(new_policy, PROMPT, 10) and new.extra_fields["global_steps"] == 3


# --- the Ray server, the replica and the trainer-side adapter ---------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def replica(ray_cluster, model_dir):
    """One replica for the module, launched the way LLMServerManager does (DictConfig model config)."""
    model_config = OmegaConf.create({"path": model_dir, "override_config": {"attn_implementation": "sdpa"}})
    hf_replica = HFReplica(replica_rank=0, config=rollout_config(), model_config=model_config, gpus_per_node=1)
    asyncio.run(hf_replica.launch_servers())
    yield hf_replica
    ray.kill(hf_replica.server_handle)


def request(server, max_tokens=10, **sampling):
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    params.update(max_tokens=max_tokens, **sampling)
    return server.generate.remote(prompt_ids=PROMPT, sampling_params=params, request_id="r")


async def test_server_generates_with_log_probs_of_the_served_model(replica, policy):
    output = await request(replica.server_handle, temperature=0.7)
    assert 1 <= len(output.token_ids) <= 10 and output.stop_reason == "completed"
    assert output.token_ids[:-1].count(EOS_ID) == 0
    if len(output.token_ids) < 10:
        assert output.token_ids[-1] == EOS_ID
    expected = forward_log_probs(policy, PROMPT, output.token_ids, temperature=0.7)
    torch.testing.assert_close(torch.tensor(output.log_probs), expected, atol=1e-4, rtol=0)

    without = await request(replica.server_handle, logprobs=False)
    assert without.log_probs is None and without.token_ids


async def test_default_budget_is_the_response_length(replica):
    params = {"temperature": 1.0, "logprobs": True, "ignore_eos": True}
    output = await replica.server_handle.generate.remote(prompt_ids=PROMPT, sampling_params=params, request_id="r")
    assert len(output.token_ids) == 8 == len(output.log_probs)


async def test_adapter_pushes_new_weights_to_the_server(replica, policy, model_dir, monkeypatch):
    new_policy = tiny_qwen2(seed=7)
    greedy_new = greedy_reference(new_policy, PROMPT, 10)
    assert greedy_new != greedy_reference(policy, PROMPT, 10)

    monkeypatch.setenv("RANK", "0")
    model_config = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"})
    adapter = HFServerAdapter(config=rollout_config(), model_config=model_config, device_mesh=None)
    await adapter.update_weights(iter(new_policy.state_dict().items()), global_steps=5, peft_config=None)
    try:
        greedy = await request(replica.server_handle, temperature=0.0, ignore_eos=True)
        assert greedy.token_ids == greedy_new
        assert greedy.extra_fields["global_steps"] == 5

        sampled = await request(replica.server_handle, temperature=1.3, ignore_eos=True)
        expected = forward_log_probs(new_policy, PROMPT, sampled.token_ids, temperature=1.3)
        torch.testing.assert_close(torch.tensor(sampled.log_probs), expected, atol=1e-4, rtol=0)
    finally:
        await adapter.update_weights(iter(policy.state_dict().items()), global_steps=None)
    restored = await request(replica.server_handle, temperature=0.0, ignore_eos=True)
    assert restored.token_ids == greedy_reference(policy, PROMPT, 10)
    # a sync without a step number keeps the version tag the trainer's metrics rely on
    assert restored.extra_fields["global_steps"] == 5


async def test_adapter_pushes_a_lora_actors_base_then_adapters_to_the_server(replica, policy, model_dir, monkeypatch):
    """The order verl's update_weights uses without lora.merge: the base once, then the adapters."""
    actor = lora_actor()
    monkeypatch.setenv("RANK", "0")
    model_config = HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"})
    adapter = HFServerAdapter(config=rollout_config(), model_config=model_config, device_mesh=None)
    peft_config, weights = adapter_update(actor)
    await adapter.update_weights(iter(base_update(actor).items()), peft_config=peft_config, base_sync_done=False)
    await adapter.update_weights(iter(weights.items()), peft_config=peft_config, base_sync_done=True, global_steps=2)
    try:
        greedy = await request(replica.server_handle, temperature=0.0, ignore_eos=True)
        assert greedy.token_ids == greedy_reference(actor, PROMPT, 10) != greedy_reference(policy, PROMPT, 10)
        sampled = await request(replica.server_handle, temperature=1.0, ignore_eos=True)
        expected = forward_log_probs(actor, PROMPT, sampled.token_ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(sampled.log_probs), expected, atol=1e-4, rtol=0)
    finally:
        # the module's other tests expect the plain policy: zero adapters leave the base as it was
        zeroed = {name: torch.zeros_like(tensor) if "lora_B" in name else tensor for name, tensor in weights.items()}
        await adapter.update_weights(iter(zeroed.items()), peft_config=peft_config, base_sync_done=True)
    assert (await request(replica.server_handle, temperature=0.0, ignore_eos=True)).token_ids == greedy_reference(
        policy, PROMPT, 10
    )


async def test_abort_parks_or_rejects_new_requests_until_resume(replica):
    server = replica.server_handle
    await server.abort_all_requests.remote()
    parked = request(server)
    ready, _ = ray.wait([parked], timeout=1.0)
    assert not ready
    await server.resume_generation.remote()
    assert (await parked).stop_reason == "completed"

    await server.abort_all_requests.remote(reject_request=True)
    rejected = await request(server)
    assert rejected.stop_reason == "aborted" and rejected.token_ids == []
    await server.resume_generation.remote()
    assert (await request(server)).stop_reason == "completed"


async def test_lifecycle_calls_of_the_trainer_are_accepted(replica):
    await asyncio.gather(replica.sleep(), replica.clear_kv_cache(), replica.release_kv_cache())
    await asyncio.gather(replica.wake_up(), replica.resume_kv_cache())
    output = await request(replica.server_handle)
    assert output.stop_reason == "completed"
    assert math.isfinite(sum(output.log_probs))


async def test_generate_batch_answers_each_request_as_generate_does(replica):
    greedy = {"temperature": 0.0, "logprobs": True, "max_tokens": 6}
    prompts = [PROMPT, PROMPT[:3], PROMPT[1:]]
    batched = await replica.server_handle.generate_batch.remote(
        [{"prompt_ids": prompt, "sampling_params": greedy, "request_id": f"r{i}"} for i, prompt in enumerate(prompts)]
    )
    for prompt, output in zip(prompts, batched, strict=True):
        alone = await replica.server_handle.generate.remote(prompt_ids=prompt, sampling_params=greedy, request_id="a")
        assert output.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(output.log_probs), torch.tensor(alone.log_probs), atol=1e-5, rtol=0)
