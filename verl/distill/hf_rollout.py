"""The ``hf`` rollout backend: transformers on the CPU, token-in/token-out, for running a verl config on a laptop.

verl 0.9.1 only ships GPU inference servers (vLLM, SGLang, TensorRT-LLM). This backend plugs a plain
transformers model into the same two interfaces so that ``actor_rollout_ref.rollout.name=hf`` works
with the unchanged agent loop and trainer:

* :class:`HFReplica` (a :class:`RolloutReplica`, registry name ``hf``) starts one
  :class:`HFRolloutServer` Ray actor per replica; the agent loop sends it ``generate`` requests.
* :class:`HFRolloutServer` holds an fp32 copy of the policy and decodes concurrent requests in
  batches (:mod:`verl.distill.request_batching`): requests with the same sampling distribution are
  left-padded and decoded together, at most ``rollout.max_num_seqs`` at once.
* :class:`HFServerAdapter` (a :class:`BaseRollout`, key ``("hf", "async")``) lives in the trainer
  worker; after every actor update it pushes the weights to the server: the full state dict, or a
  LoRA actor's adapters (:mod:`verl.distill.rollout_weights`).

The decoding core (:func:`sampling_log_probs`, :func:`decode`) is plain torch so it can be checked
against a direct forward pass without Ray.
"""

import asyncio
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import ray
import torch
from transformers import AutoModelForCausalLM

from verl.distill.request_batching import RequestAborted, RequestBatcher
from verl.distill.rollout_weights import load_adapters, load_base_weights, load_full_state_dict, underlying_model
from verl.utils import normalize_token_ids
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator, get_max_position_embeddings

# Sampling-parameter keys a request may carry; verl's agent loops send the first five.
SUPPORTED_SAMPLING_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "logprobs",
    "max_tokens",
    "max_new_tokens",
    "ignore_eos",
    "do_sample",
    "prompt_logprobs",
)


@dataclass(frozen=True)
class SamplingSettings:
    """How one request is decoded.

    Attributes:
        temperature: divides the logits before sampling; 0 means greedy.
        top_k: keep only the ``top_k`` most likely tokens; -1 or 0 keeps all (vLLM's convention).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
        greedy: take the arg-max token (temperature 0 or ``do_sample=False``).
        max_tokens: hard cap on the number of generated tokens (always >= 1).
        return_log_probs: return the log-prob of every generated token (``logprobs`` request key).
        ignore_eos: keep generating after an end-of-sequence token.
        score_prompt: generate nothing; return the log-prob of each prompt token after the first under
            this distribution (vLLM's ``prompt_logprobs=0`` request, see :func:`prompt_log_probs`).
    """

    temperature: float
    top_k: int
    top_p: float
    greedy: bool
    max_tokens: int
    return_log_probs: bool
    ignore_eos: bool
    score_prompt: bool = False

    @property
    def distribution(self) -> tuple:
        """What :func:`sampling_log_probs` depends on: requests that agree on it can be decoded in one batch
        (prompts to score form batches of their own)."""
        base = ("greedy",) if self.greedy else ("sample", self.temperature, self.top_k, self.top_p)
        return ("score", *base) if self.score_prompt else base


def resolve_sampling(
    sampling_params: dict[str, Any], config: RolloutConfig, prompt_len: int, max_model_len: int
) -> SamplingSettings:
    """Turn a request's ``sampling_params`` into :class:`SamplingSettings`, with verl's defaults.

    The token budget follows verl's vLLM server: the request's ``max_tokens`` (or ``max_new_tokens``),
    else ``min(response_length, prompt_length + response_length - prompt_len)``; clipped to
    ``[1, max_model_len - prompt_len]``.
    """
    unknown = sorted(set(sampling_params) - set(SUPPORTED_SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"hf rollout: unsupported sampling_params key(s) {unknown}; supported: {list(SUPPORTED_SAMPLING_KEYS)}"
        )
    repetition_penalty = sampling_params.get("repetition_penalty", config.repetition_penalty)
    if repetition_penalty != 1.0:
        raise ValueError(
            f"hf rollout: repetition_penalty={repetition_penalty} is not supported (the trainer's log-probs "
            "would not match the sampling distribution); set actor_rollout_ref.rollout.repetition_penalty=1.0"
        )
    temperature = float(sampling_params.get("temperature", config.temperature))
    top_k = int(sampling_params.get("top_k", config.top_k))
    top_p = float(sampling_params.get("top_p", config.top_p))
    if temperature < 0 or not 0 < top_p <= 1 or top_k < -1:
        raise ValueError(
            f"hf rollout: invalid sampling params temperature={temperature}, top_k={top_k}, top_p={top_p}; "
            "need temperature >= 0, top_k >= -1 and 0 < top_p <= 1"
        )

    prompt_logprobs = sampling_params.get("prompt_logprobs")
    if prompt_logprobs not in (None, 0):
        raise ValueError(
            f"hf rollout: prompt_logprobs={prompt_logprobs} (the top alternatives of each prompt token) is not "
            "supported; 0 returns each prompt token's own log-prob"
        )
    room = max_model_len - prompt_len
    if prompt_logprobs == 0:
        room += 1  # a prompt to score may fill the model's context: nothing is generated after it
    if room < 1:
        raise ValueError(
            f"hf rollout: prompt of {prompt_len} tokens leaves no room within max_model_len={max_model_len}; "
            "shorten data.max_prompt_length or raise actor_rollout_ref.rollout.max_model_len"
        )
    requested = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
    if requested is None:
        requested = min(config.response_length, config.prompt_length + config.response_length - prompt_len)

    return SamplingSettings(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=temperature == 0 or not sampling_params.get("do_sample", True),
        max_tokens=max(1, min(int(requested), room)),
        return_log_probs=bool(sampling_params.get("logprobs", False)),
        ignore_eos=bool(sampling_params.get("ignore_eos", config.ignore_eos)),
        score_prompt=prompt_logprobs == 0,
    )


def sampling_log_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Log-probabilities of the distribution the next token is drawn from, for logits of shape ``[..., vocab]``.

    With ``z = logits / temperature``:

    * top-k keeps the tokens with ``z_i >= z_(k)`` (the k-th largest value; ties are kept);
    * top-p then keeps the most likely tokens, in descending order, until the kept probability mass
      ``softmax(z)`` over the top-k set reaches ``top_p`` (the most likely token is always kept);
    * ``log p_i = z_i - logsumexp_{j kept} z_j`` for kept tokens and ``-inf`` for the others.

    Greedy decoding samples nothing; it reports ``log_softmax(logits)``, the unscaled model
    distribution, as vLLM does for temperature 0. These are verl's "processed" log-probs
    (vLLM ``logprobs_mode=processed_logprobs``): with top_k=-1 and top_p=1 they equal the trainer's
    ``log_softmax(logits / temperature)``.
    """
    logits = logits.float()
    if settings.greedy:
        return torch.log_softmax(logits, dim=-1)
    scaled = logits / settings.temperature
    if 0 < settings.top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, settings.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scaled, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scaled, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= settings.top_p
        drop_sorted[..., 0] = False
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


@dataclass
class Decoded:
    """One decoded continuation: tokens, their log-probs and whether an abort cut it short."""

    token_ids: list[int]
    log_probs: list[float]
    aborted: bool


# Left padding fills short prompts with this id; the attention mask hides it, so any valid id works.
PAD_TOKEN_ID = 0


def _last_position_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """Forward kwargs that skip the logits of all but the last position, where the model supports it.

    A left-padded batch's logits over whole prompts would take rows x prompt length x vocabulary floats.
    A PEFT wrapper passes the keyword on to the model it wraps.
    """
    forward = underlying_model(model).forward
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: Sequence[SamplingSettings],
    eos_token_ids: frozenset[int],
    generator: torch.Generator,
    should_abort: Callable[[], bool] = lambda: False,
) -> list[Decoded]:
    """Generate a continuation of every prompt, decoding them together with one KV cache.

    The prompts are left-padded to a common length (attention mask 0 on the padding, position ids
    counted from each prompt's first real token), so each row sees exactly what it would see alone.
    All rows must share one sampling distribution (:attr:`SamplingSettings.distribution`); token
    budgets and ``ignore_eos`` are per row. A row stops after its first end-of-sequence token (which
    is returned, as vLLM does) unless it ignores EOS, or at its ``max_tokens``, and then leaves the
    batch. ``should_abort`` is polled before every step so a weight sync can interrupt long requests
    (partial rollout): the rows still decoding are returned as aborted, with their tokens so far.
    """
    distributions = {row_settings.distribution for row_settings in settings}
    if len(distributions) != 1 or len(settings) != len(prompts):
        raise ValueError(
            f"hf rollout: a batch needs one sampling setting per prompt, all with one distribution; "
            f"got {len(prompts)} prompts and distributions {sorted(map(str, distributions))}"
        )
    sampler = settings[0]
    rows = len(prompts)
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((rows, width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    prompt_lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)
    budgets = torch.tensor([row_settings.max_tokens for row_settings in settings])
    stops_at_eos = torch.tensor([not row_settings.ignore_eos for row_settings in settings])
    eos_ids = torch.tensor(sorted(eos_token_ids), dtype=torch.long)
    last_position_only = _last_position_logits_only(model)

    results = [Decoded(token_ids=[], log_probs=[], aborted=False) for _ in prompts]
    decoding = torch.arange(rows)  # the prompt index of each batch row still decoding
    cache = None
    generated = 0
    while decoding.numel():
        if should_abort():
            for row in decoding.tolist():
                results[row].aborted = True
            break
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **last_position_only,
        )
        cache = output.past_key_values
        step_log_probs = sampling_log_probs(output.logits[:, -1], sampler)
        if sampler.greedy:
            tokens = torch.argmax(step_log_probs, dim=-1)
        else:
            tokens = torch.multinomial(step_log_probs.exp(), num_samples=1, generator=generator)[:, 0]
        token_log_probs = step_log_probs.gather(-1, tokens[:, None])[:, 0]
        for row, token, log_prob in zip(decoding.tolist(), tokens.tolist(), token_log_probs.tolist(), strict=True):
            results[row].token_ids.append(token)
            results[row].log_probs.append(log_prob)
        generated += 1

        finished = (budgets[decoding] <= generated) | (stops_at_eos[decoding] & torch.isin(tokens, eos_ids))
        if finished.any():
            keep = torch.nonzero(~finished)[:, 0]
            if keep.numel():
                cache.reorder_cache(keep)
            decoding, tokens, attention_mask = decoding[keep], tokens[keep], attention_mask[keep]
        input_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], dim=-1)
        position_ids = prompt_lengths[decoding][:, None] + (generated - 1)
    return results


@torch.inference_mode()
def prompt_log_probs(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], settings: SamplingSettings
) -> list[list[float]]:
    """log p(token t + 1 | tokens up to t) of every sequence, for t = 0 .. len - 2, under the distribution
    tokens are sampled from (:func:`sampling_log_probs`): what :func:`decode` reports for a token it
    generated. One forward pass over the right-padded batch."""
    rows, width = len(sequences), max(len(sequence) for sequence in sequences)
    input_ids = torch.full((rows, width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    next_log_probs = sampling_log_probs(logits[:, :-1], settings).gather(-1, input_ids[:, 1:, None])[..., 0]
    return [next_log_probs[row, : len(sequence) - 1].tolist() for row, sequence in enumerate(sequences)]


def eos_token_ids(model_config: HFModelConfig) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (an int or a list) plus the tokenizer's."""
    ids: set[int] = set()
    generation_eos = getattr(model_config.generation_config, "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(generation_eos)
    tokenizer_eos = getattr(model_config.tokenizer, "eos_token_id", None)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return frozenset(ids)


def server_actor_name(
    replica_rank: int, is_reward_model: bool = False, is_teacher_model: bool = False, name_suffix: str = ""
) -> str:
    """Ray actor name of a replica's server; :class:`HFServerAdapter` finds the policy server by it."""
    role = "reward_" if is_reward_model else "teacher_" if is_teacher_model else ""
    return f"hf_server_{role}{replica_rank}{name_suffix}"


@dataclass(frozen=True)
class GenerateRequest:
    """One queued ``generate`` call."""

    prompt_ids: list[int]
    settings: SamplingSettings


class HFRolloutServer:
    """Ray actor serving one replica: token-in/token-out generation with a transformers model.

    Concurrent ``generate`` calls are queued and decoded in batches (:class:`RequestBatcher`): one
    batch at a time, in a worker thread, so control calls (weight updates, aborts) stay responsive.
    A batch holds requests with the same sampling distribution, at most
    ``actor_rollout_ref.rollout.max_num_seqs`` of them; that bounds memory, since the KV cache holds
    rows x (longest prompt + response) positions. A weight update waits for the running batch and
    applies before the next one: no response mixes two weight versions, and requests still queued
    then are decoded with the new weights. The model is a separate fp32 copy loaded from
    ``model_config.local_path`` with sdpa attention; the trainer overwrites it on every sync.
    """

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, replica_rank: int):
        self.config: RolloutConfig = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_config.local_path,
            config=self.model_config.hf_config,
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=self.model_config.trust_remote_code,
        ).eval()
        self.max_model_len = self.config.max_model_len or get_max_position_embeddings(self.model_config.hf_config)
        self.eos_token_ids = eos_token_ids(self.model_config)
        self.generator = torch.Generator().manual_seed(self.config.seed + replica_rank)
        # model weights version, reported with every response like verl's other servers
        self.global_steps: Optional[int] = None

        self._batcher: RequestBatcher[GenerateRequest, TokenOutput] = RequestBatcher(
            self._decode_batch,
            batch_key=lambda request: request.settings.distribution,
            max_batch_size=self.config.max_num_seqs,
        )
        # cleared by abort_all_requests: new requests wait (or are rejected) until resume_generation
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._rejecting = False

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
    ) -> TokenOutput:
        """Generate a continuation of ``prompt_ids``; ``log_probs`` only when ``sampling_params['logprobs']``.

        ``request_id`` and ``priority`` complete the call signature verl's agent loop uses; requests
        are batched in arrival order.
        """
        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("hf rollout: multimodal inputs are not supported; use a text-only dataset")
        prompt_ids = normalize_token_ids(prompt_ids)
        settings = resolve_sampling(sampling_params, self.config, len(prompt_ids), self.max_model_len)

        while not self._admitting.is_set():
            if self._rejecting:
                return self._aborted_output()
            await self._admitting.wait()
        try:
            return await self._batcher.submit(GenerateRequest(prompt_ids, settings))
        except RequestAborted:
            return self._aborted_output()

    async def generate_batch(self, requests: list[dict[str, Any]]) -> list[TokenOutput]:
        """``generate`` for each of ``requests`` (its keyword arguments), in one Ray call.

        The requests share batches as concurrent ``generate`` calls do; what is saved is one Ray call
        per request (see :mod:`verl.distill.batched_agent_loop`).
        """
        return list(await asyncio.gather(*(self.generate(**request) for request in requests)))

    def _decode_batch(self, requests: list[GenerateRequest], should_abort: Callable[[], bool]) -> list[TokenOutput]:
        if requests[0].settings.score_prompt:
            return self._score_batch(requests)
        decoded = decode(
            self.model,
            [request.prompt_ids for request in requests],
            [request.settings for request in requests],
            self.eos_token_ids,
            self.generator,
            should_abort,
        )
        return [
            TokenOutput(
                token_ids=result.token_ids,
                log_probs=result.log_probs if request.settings.return_log_probs else None,
                stop_reason="aborted" if result.aborted else "completed",
                extra_fields={"global_steps": self.global_steps},
            )
            for request, result in zip(requests, decoded, strict=True)
        ]

    def _score_batch(self, requests: list[GenerateRequest]) -> list[TokenOutput]:
        """Prompt log-probs laid out as verl's vLLM server returns them: row t holds token t + 1 and its
        log-prob, and a zero row pads the last position."""
        sequences = [request.prompt_ids for request in requests]
        scored = prompt_log_probs(self.model, sequences, requests[0].settings)
        return [
            TokenOutput(
                token_ids=[],
                stop_reason="completed",
                extra_fields={
                    "global_steps": self.global_steps,
                    "prompt_ids": [[token] for token in sequence[1:]] + [[0]],
                    "prompt_logprobs": [[log_prob] for log_prob in log_probs] + [[0.0]],
                },
            )
            for sequence, log_probs in zip(sequences, scored, strict=True)
        ]

    def _aborted_output(self) -> TokenOutput:
        return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": self.global_steps})

    async def update_weights(
        self,
        state_dict: dict[str, torch.Tensor],
        global_steps: Optional[int] = None,
        peft_config: Optional[dict[str, Any]] = None,
        base_sync_done: bool = True,
    ):
        """Replace the weights between two batches, so no response mixes two versions.

        ``peft_config`` marks a LoRA actor's update (:mod:`verl.distill.rollout_weights`): its base
        weights when ``base_sync_done`` is false, else its adapters. A sync without a step number (verl
        re-syncs that way around validation) keeps the current version tag, as verl's vLLM adapter
        does: the trainer's metrics need an integer tag.
        """
        async with self._batcher.exclusive():
            if peft_config is None:
                load_full_state_dict(self.model, state_dict)
            elif not base_sync_done:
                load_base_weights(self.model, state_dict)
            else:
                self.model = load_adapters(self.model, peft_config, state_dict)
            if global_steps is not None:
                self.global_steps = global_steps

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    async def abort_all_requests(self, reject_request: bool = False):
        """Stop the running batch after its current token and answer queued requests with ``aborted``.

        New requests wait until :meth:`resume_generation`, or are answered ``aborted`` at once when
        ``reject_request`` (the replica leaves rotation). Returns once no request is decoding.
        """
        self._rejecting = reject_request
        self._admitting.clear()
        await self._batcher.abort()

    async def resume_generation(self):
        self._rejecting = False
        self._admitting.set()

    # The model lives in ordinary process memory for the whole run: there is no device memory to
    # release, no KV cache kept between requests and no engine profiler.
    async def wake_up(self, tags: Optional[list[str]] = None):
        pass

    async def sleep(self):
        pass

    async def clear_kv_cache(self):
        pass

    async def release_kv_cache(self):
        pass

    async def resume_kv_cache(self):
        pass

    async def start_profile(self, **kwargs):
        pass

    async def stop_profile(self):
        pass


class HFReplica(RolloutReplica):
    """A rollout replica backed by one :class:`HFRolloutServer` actor (no accelerator needed).

    The server ignores the replica's workers and resource bundles: it is an ordinary Ray actor that
    holds no CPU reservation once started (Ray then gives it one torch thread), so it does not take
    scheduling slots from the trainer's workers.
    """

    async def launch_servers(self):
        name = server_actor_name(self.replica_rank, self.is_reward_model, self.is_teacher_model, self.name_suffix)
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, max_concurrency=self.max_concurrency)
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        # surface a failed model load here rather than at the first generate call
        await server.__ray_ready__.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name


class HFServerAdapter(BaseRollout):
    """Trainer-side handle of the ``hf`` rollout: forwards weight updates to the replica's server.

    Every trainer rank of a replica receives the weights (``DTensor.full_tensor`` is a collective,
    so all ranks must drain the generator); only the replica's first rank sends them.
    """

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ["RANK"])
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.is_leader_rank = rank % rollout_world_size == 0
        self._server = None

    def _server_actor(self):
        # looked up lazily: the server is launched after the trainer workers are built
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        """Nothing to resume: the server keeps its weights in process memory."""

    async def release(self):
        """Nothing to release: the server keeps its weights in process memory."""

    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        global_steps: Optional[int] = None,
        peft_config: Optional[dict[str, Any]] = None,
        base_sync_done: bool = True,
        **kwargs,
    ):
        """Collect the ``(name, tensor)`` stream on the CPU and push it to the server in one call.

        A LoRA actor's stream (``peft_config`` set) holds its base weights (``base_sync_done=False``)
        or its adapters; the server applies either (:mod:`verl.distill.rollout_weights`).
        """
        if wire_format != "named_tensors":
            raise ValueError(
                f"hf rollout: checkpoint engine wire_format={wire_format!r} is not supported; "
                "use actor_rollout_ref.rollout.checkpoint_engine.backend=naive"
            )
        state_dict = {}
        async for name, tensor in ensure_async_iterator(weights):
            if self.is_leader_rank:
                state_dict[name] = tensor.detach().cpu()
        if self.is_leader_rank:
            await self._server_actor().update_weights.remote(state_dict, global_steps, peft_config, base_sync_done)
