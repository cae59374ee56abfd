"""verl's v1 agent loop with its per-sample remote calls gathered into one call per burst.

verl 0.9.1's ``AgentLoopWorkerTQ`` runs every sample on its own: it builds the agent loop with Hydra,
asks the load balancer actor for a server, calls the server, sends the sample to a reward worker,
and writes TransferQueue three times (status "running", the trajectory, the final status). On a
CPU that is ~20 ms of Python and Ray per sample, 60x the cost of decoding a toy sample, and it is
most of a toy step. :class:`BatchedAgentLoopWorker` runs the same agent loops (verl's
``SingleTurnAgentLoop`` etc., unchanged) for the same fire-and-forget protocol, but:

* the calls its samples make while the event loop turns over are gathered (:class:`BurstGatherer`)
  and sent as one call: one load-balancer acquire and one ``generate_batch`` to the hf server, one
  ``compute_score_batch`` to a reward worker, one TransferQueue put for the trajectories and one for
  the status tags;
* a stateless agent loop (``SingleTurnAgentLoop``) is built once per name, not once per sample.

What the trainer reads from TransferQueue (keys, fields, tags, statuses, their order per prompt) is
what verl's worker writes. Selected through verl's extension point
``actor_rollout_ref.rollout.agent.agent_loop_manager_class`` (the default of a CPU job).

``_run_prompt``, ``_run_agent_loop`` and ``_agent_loop_postprocess`` re-implement verl's private
methods of the same names, and the batched calls use private helpers of verl's worker and LLM
client: :data:`VERL_CODE_RELIED_ON` pins each to the source it was written from, and importing this
module on any other code fails with one line naming the method (and how to use verl's own loop).
"""

import asyncio
import logging
import random
from typing import Any, Optional

import hydra
import numpy as np
import ray
import torch
import transfer_queue as tq
from tensordict import TensorDict

from verl.distill.compat import require_supported_verl, require_unchanged
from verl.distill.request_batching import BurstGatherer
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopOutput,
    AgentLoopWorker,
    DictConfigWrap,
    ToolListWrap,
    _agent_loop_registry,
)
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.protocol import DataProto
from verl.trainer.ppo.v1.agent_loop_tq import (
    AgentLoopManagerTQ,
    AgentLoopWorkerTQ,
    _settle_session_tasks,
    apply_greedy_sampling_params,
)
from verl.utils.profiler import simple_timer
from verl.utils.rollout_trace import rollout_trace_attr
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.replica import TokenOutput

logger = logging.getLogger(__name__)

# verl declares its worker as a Ray actor class; the class it wraps is the one to extend
_VERL_WORKER = AgentLoopWorkerTQ.__ray_actor_class__

VERL_CODE_RELIED_ON = (
    (_VERL_WORKER._run_prompt, "2adabe2def267da2"),
    (_VERL_WORKER._agent_loop_postprocess, "5386c291e4db91dd"),
    (_settle_session_tasks, "21a713e8560104b4"),
    (AgentLoopWorker._run_agent_loop, "afb90a4a12333ee0"),
    (AgentLoopWorker._compute_score, "3d35bd85469ef8c5"),
    (LLMServerClient._acquire_server, "f2e3d5305b2bc601"),
    (LLMServerClient._release_server, "293515c2c820f864"),
)
_USE_VERLS_AGENT_LOOP = (
    "use verl's own agent loop (actor_rollout_ref.rollout.agent.agent_loop_manager_class="
    "verl.trainer.ppo.v1.agent_loop_tq.AgentLoopManagerTQ) or the verl version verl-distill was written for"
)

require_supported_verl()
for _function, _fingerprint in VERL_CODE_RELIED_ON:
    require_unchanged(_function, _fingerprint, _USE_VERLS_AGENT_LOOP)

class BatchedServerClient:
    """Stands in for verl's ``LLMServerClient`` towards the agent loops: text-only ``generate`` calls
    of a burst go to one server in one ``generate_batch`` call (:class:`HFRolloutServer`)."""

    def __init__(self, llm_client):
        self._llm_client = llm_client
        self._gatherer: BurstGatherer[dict, TokenOutput] = BurstGatherer(self._generate_batch)

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        **_server_specific: Any,  # priority, mm_processor_*: meaningless to the hf server
    ) -> TokenOutput:
        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("hf rollout: multimodal inputs are not supported; use a text-only dataset")
        return await self._gatherer.call(
            {"request_id": request_id, "prompt_ids": prompt_ids, "sampling_params": sampling_params}
        )

    async def _generate_batch(self, requests: list[dict]) -> list[TokenOutput]:
        request_id = requests[0]["request_id"]
        server_id, server = await self._llm_client._acquire_server(request_id)
        try:
            outputs = await server.generate_batch.remote(requests)
        finally:
            self._llm_client._release_server(server_id, request_id=request_id)
        for output in outputs:
            # the weights version a response was made with, as verl's client reports it
            steps = output.extra_fields.get("global_steps")
            output.extra_fields.setdefault("min_global_steps", steps)
            output.extra_fields.setdefault("max_global_steps", steps)
        return outputs


class BatchedAgentLoopWorker(_VERL_WORKER):
    """``AgentLoopWorkerTQ`` whose remote calls are gathered per burst (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._server_client = BatchedServerClient(self.llm_client)
        self._stateless_agent_loops: dict[str, Any] = {}
        self._status_puts: BurstGatherer[tuple, None] = BurstGatherer(self._put_statuses)
        self._trajectory_puts: BurstGatherer[tuple, None] = BurstGatherer(self._put_trajectories)
        self._scores: BurstGatherer[tuple, dict] = BurstGatherer(self._score_batch)

    async def _run_prompt(self, prompt: dict, sampling_params: dict, trajectory: dict, trace: bool = False) -> None:
        """The ``n`` sessions of one prompt; its status goes from "running" to "finished" or "failure"."""
        uid, validate = prompt["uid"], trajectory["validate"]
        partition_id = "val" if validate else "train"
        await self._status_puts.call((partition_id, uid, "running"))
        sessions = []
        try:
            config = self.config.actor_rollout_ref.rollout
            n = prompt.pop("__rollout_n__", config.val_kwargs.n if validate else config.n)
            do_sample = prompt.pop("__do_sample__", True)
            session_params = dict(sampling_params)
            if not validate and not do_sample:
                apply_greedy_sampling_params(session_params)
            sessions = [
                asyncio.create_task(
                    self._run_agent_loop(
                        session_params, trajectory=trajectory, trace=trace, session_id=index, **prompt
                    )
                )
                for index in range(n)
            ]
            # the status is published once every session has settled, as verl's worker does, so that
            # no session writes after the trainer has cleared a failed group
            errors = await _settle_session_tasks(sessions)
        except Exception as error:
            if sessions:
                await _settle_session_tasks(sessions)
            errors = [error]
        for error in errors:
            logger.error(f"agent loop failed for uid={uid}", exc_info=(type(error), error, error.__traceback__))
        await self._status_puts.call((partition_id, uid, "failure" if errors else "finished"))

    async def _run_agent_loop(
        self, sampling_params: dict, trajectory: dict, *, agent_name: str, trace: bool = True, **kwargs
    ) -> None:
        with rollout_trace_attr(
            step=trajectory["step"],
            sample_index=trajectory["sample_index"],
            rollout_n=trajectory["rollout_n"],
            validate=trajectory["validate"],
            name="agent_loop",
            trace=trace,
        ):
            if agent_name not in _agent_loop_registry:
                raise ValueError(f"agent loop {agent_name!r} is not registered; known: {sorted(_agent_loop_registry)}")
            agent_loop = self._agent_loop(agent_name)
            output = await agent_loop.run(sampling_params, **kwargs)
            await self._agent_loop_postprocess(output, trajectory["validate"], **kwargs)

    def _agent_loop(self, agent_name: str):
        if agent_name in self._stateless_agent_loops:
            return self._stateless_agent_loops[agent_name]
        agent_loop = hydra.utils.instantiate(
            config=_agent_loop_registry[agent_name],
            trainer_config=DictConfigWrap(config=self.config),
            server_manager=self._server_client,
            tokenizer=self.tokenizer,
            processor=self.processor,
            hf_model_type=self.hf_model_type,
            dataset_cls=self.dataset_cls,
            data_config=DictConfigWrap(self.config.data),
            tools=ToolListWrap(self.tools),
        )
        # SingleTurnAgentLoop keeps nothing of a run on itself: one instance serves every sample
        if type(agent_loop) is SingleTurnAgentLoop:
            self._stateless_agent_loops[agent_name] = agent_loop
        return agent_loop

    async def _agent_loop_postprocess(
        self, output: AgentLoopOutput | list[AgentLoopOutput], validate, **kwargs
    ) -> None:
        uid, session_id = kwargs["uid"], kwargs["session_id"]
        outputs = output if isinstance(output, list) else [output]
        if not outputs:
            logger.warning(f"agent loop returned no output for {uid}_{session_id}")
            return
        final = outputs[-1]
        if final.reward_score is None and self.reward_loop_worker_handles is not None:
            if len(outputs) == 1:
                timing = {}
                with simple_timer("compute_score", timing):
                    result = await self._scores.call((final, kwargs))
                final.reward_score = result["reward_score"]
                final.extra_fields["reward_extra_info"] = result["reward_extra_info"]
                final.metrics.compute_score = timing["compute_score"]
            else:  # a multi-output trajectory is scored as a whole, as verl does
                await self._compute_score(outputs, kwargs=kwargs)
        await self._compute_teacher_logprobs(
            final,
            prompt_ids=final.prompt_ids,
            response_ids=final.response_ids,
            validate=validate,
            sample_kwargs=kwargs,
        )
        if final.reward_score is not None:
            for earlier in outputs[:-1]:
                earlier.reward_score = final.reward_score
                earlier.extra_fields["reward_extra_info"] = final.extra_fields["reward_extra_info"]
        rows = [self._trajectory_row(one, f"{uid}_{session_id}_{index}", kwargs) for index, one in enumerate(outputs)]
        await self._trajectory_puts.call(("val" if validate else "train", rows))

    def _trajectory_row(self, output: AgentLoopOutput, key: str, kwargs: dict) -> tuple[str, dict, dict]:
        """(key, fields, tag) of one agent-loop output, laid out as verl's TransferQueue trainer reads it."""
        input_ids = torch.tensor(output.prompt_ids + output.response_ids, dtype=torch.int64)
        multi_modal_inputs = self._compute_multi_modal_inputs(output, input_ids)
        position_ids = self._compute_position_ids(
            input_ids.unsqueeze(0), torch.ones_like(input_ids).unsqueeze(0), multi_modal_inputs
        ).squeeze(0)
        fields = {**output.as_dict(), **kwargs}
        fields.pop("multi_modal_data", None)  # raw images/videos are not stored
        fields["loss_mask"] = fields["response_mask"]
        fields["input_ids"] = input_ids
        fields["position_ids"] = position_ids
        fields["multi_modal_inputs"] = multi_modal_inputs
        prompt_len, response_len = len(output.prompt_ids), len(output.response_ids)
        tag = {
            "status": "success",
            "prompt_len": prompt_len,
            "response_len": response_len,
            "seq_len": prompt_len + response_len,
            # the trainer's staleness control reads these
            "global_steps": kwargs["global_steps"],
            "min_global_steps": fields["extra_fields"].get("min_global_steps"),
            "max_global_steps": fields["extra_fields"].get("max_global_steps"),
        }
        return key, fields, tag

    async def _put_statuses(self, updates: list[tuple[str, str, str]]) -> list[None]:
        for partition_id in {partition for partition, _, _ in updates}:
            keys = [uid for partition, uid, _ in updates if partition == partition_id]
            tags = [{"status": status} for partition, _, status in updates if partition == partition_id]
            await tq.async_kv_batch_put(keys=keys, partition_id=partition_id, tags=tags)
        return [None] * len(updates)

    async def _put_trajectories(self, batches: list[tuple[str, list[tuple[str, dict, dict]]]]) -> list[None]:
        for partition_id in {partition for partition, _ in batches}:
            rows = [row for partition, part_rows in batches if partition == partition_id for row in part_rows]
            await tq.async_kv_batch_put(
                keys=[key for key, _, _ in rows],
                fields=list_of_dict_to_tensordict([fields for _, fields, _ in rows]),
                tags=[tag for _, _, tag in rows],
                partition_id=partition_id,
            )
        return [None] * len(batches)

    async def _score_batch(self, samples: list[tuple[AgentLoopOutput, dict]]) -> list[dict]:
        """One ``compute_score_batch`` call: row i is what verl sends alone for sample i."""
        outputs = [output for output, _ in samples]
        columns: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("prompts", "responses", "input_ids", "attention_mask", "position_ids")
        }
        for output in outputs:
            prompt = torch.tensor(output.prompt_ids, dtype=torch.int64)
            response = torch.tensor(output.response_ids, dtype=torch.int64)
            input_ids = torch.cat([prompt, response])
            attention_mask = torch.ones_like(input_ids)
            position_ids = self._compute_position_ids(
                input_ids.unsqueeze(0),
                attention_mask.unsqueeze(0),
                self._compute_multi_modal_inputs(output, input_ids),
                output.mm_processor_kwargs or self._get_mm_processor_kwargs(None),
            ).squeeze(0)
            for key, value in zip(columns, (prompt, response, input_ids, attention_mask, position_ids), strict=True):
                columns[key].append(value)
        batch = TensorDict(
            {
                key: torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=0)
                for key, values in columns.items()
            },
            batch_size=len(samples),
        )
        non_tensor = {key: _object_array([kwargs[key] for _, kwargs in samples]) for key in samples[0][1]}
        non_tensor.update(
            {
                "__num_turns__": np.array([output.num_turns for output in outputs]),
                "tool_extra_fields": _object_array([output.extra_fields for output in outputs]),
                "prompt_len": np.array([len(output.prompt_ids) for output in outputs]),
                "response_len": np.array([len(output.response_ids) for output in outputs]),
            }
        )
        worker = random.choice(self.reward_loop_worker_handles)
        return await worker.compute_score_batch.remote(DataProto(batch=batch, non_tensor_batch=non_tensor))


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


class BatchedAgentLoopManager(AgentLoopManagerTQ):
    """verl's v1 agent-loop manager with :class:`BatchedAgentLoopWorker` workers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ray.remote(BatchedAgentLoopWorker)
