"""The batched agent loop: bursts of calls become one call, and what it sends is what verl sends."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from verl.distill.batched_agent_loop import BatchedAgentLoopWorker, BatchedServerClient
from verl.distill.request_batching import BurstGatherer
from verl.distill.cpu_defaults import BATCHED_AGENT_LOOP_MANAGER, adapt_config_for_cpu
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.workers.rollout.replica import TokenOutput

MANAGER_KEY = "actor_rollout_ref.rollout.agent.agent_loop_manager_class"


async def test_calls_of_one_burst_are_one_batch_in_call_order():
    batches = []

    async def run(items):
        batches.append(list(items))
        return [item * 10 for item in items]

    gatherer = BurstGatherer(run)
    assert await asyncio.gather(*(gatherer.call(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert await gatherer.call(7) == 70
    assert batches == [[0, 1, 2, 3, 4], [7]]


async def test_a_failing_batch_fails_each_of_its_calls_and_the_next_burst_works():
    async def run(items):
        if "bad" in items:
            raise RuntimeError("server gone")
        return items

    gatherer = BurstGatherer(run)
    results = await asyncio.gather(gatherer.call("a"), gatherer.call("bad"), return_exceptions=True)
    assert [type(result) for result in results] == [RuntimeError, RuntimeError]
    assert await gatherer.call("c") == "c"


class _FakeServer:
    def __init__(self):
        self.calls = []
        self.generate_batch = SimpleNamespace(remote=self._generate_batch)

    async def _generate_batch(self, requests):
        self.calls.append(requests)
        return [
            TokenOutput(token_ids=[len(request["prompt_ids"])], extra_fields={"global_steps": 3})
            for request in requests
        ]


class _FakeLLMClient:
    def __init__(self, server):
        self.server, self.acquired, self.released = server, [], []

    async def _acquire_server(self, request_id, **fields):
        self.acquired.append(request_id)
        return "server-0", self.server

    def _release_server(self, server_id, request_id=None):
        self.released.append((server_id, request_id))


async def test_generate_calls_of_a_burst_go_to_the_server_in_one_call():
    server = _FakeServer()
    llm_client = _FakeLLMClient(server)
    client = BatchedServerClient(llm_client)
    outputs = await asyncio.gather(
        *(
            client.generate(f"r{i}", prompt_ids=[1] * (i + 1), sampling_params={"temperature": 1.0}, priority=i)
            for i in range(4)
        )
    )
    assert [output.token_ids for output in outputs] == [[1], [2], [3], [4]]
    assert len(server.calls) == 1 and [request["request_id"] for request in server.calls[0]] == ["r0", "r1", "r2", "r3"]
    assert "priority" not in server.calls[0][0]  # meaningless to the hf server
    assert llm_client.acquired == ["r0"] and llm_client.released == [("server-0", "r0")]
    # the weights version of a response, as verl's client reports it
    assert all(
        output.extra_fields["min_global_steps"] == output.extra_fields["max_global_steps"] == 3 for output in outputs
    )
    with pytest.raises(ValueError, match="multimodal"):
        await client.generate("r", prompt_ids=[1], sampling_params={}, image_data=["image"])


def _bare_worker() -> BatchedAgentLoopWorker:
    """A worker with only what scoring reads (verl's __init__ would start TransferQueue and a tokenizer)."""
    worker = object.__new__(BatchedAgentLoopWorker)
    worker.processor = None
    worker.mm_processor_kwargs = None
    worker.sent = []

    async def remote(data):
        worker.sent.append(data)
        return [{"reward_score": float(i), "reward_extra_info": {}} for i in range(len(data))]

    async def remote_single(data):
        worker.sent.append(data)
        return {"reward_score": 0.0, "reward_extra_info": {}}

    worker.reward_loop_worker_handles = [
        SimpleNamespace(
            compute_score_batch=SimpleNamespace(remote=remote), compute_score=SimpleNamespace(remote=remote_single)
        )
    ]
    return worker


def _output(prompt, response):
    return AgentLoopOutput(
        prompt_ids=prompt, response_ids=response, response_mask=[1] * len(response), num_turns=2, metrics={}
    )


async def test_a_batch_of_scores_sends_row_by_row_what_verl_sends_for_each_sample():
    samples = [
        (_output([5, 6, 7], [8, 9]), {"data_source": "toy", "reward_model": {"ground_truth": "1"}, "uid": "a"}),
        (_output([5], [8, 9, 10, 11]), {"data_source": "toy", "reward_model": {"ground_truth": "2"}, "uid": "b"}),
    ]
    worker = _bare_worker()
    results = await worker._score_batch(samples)
    assert [result["reward_score"] for result in results] == [0.0, 1.0]
    batched = worker.sent.pop()
    for row, (output, kwargs) in enumerate(samples):
        await worker._compute_score([output.model_copy()], kwargs=kwargs)  # verl's own path, one sample
        alone = worker.sent.pop()
        width = alone.batch["input_ids"].shape[1]
        for key in ("input_ids", "attention_mask", "position_ids"):
            torch.testing.assert_close(batched.batch[key][row, :width], alone.batch[key][0])
            assert not batched.batch[key][row, width:].any()  # the rest is padding
        for key in ("prompts", "responses"):
            size = alone.batch[key].shape[1]
            torch.testing.assert_close(batched.batch[key][row, :size], alone.batch[key][0])
        for key, values in alone.non_tensor_batch.items():
            assert batched.non_tensor_batch[key][row] == values[0], key
        assert set(batched.non_tensor_batch) == set(alone.non_tensor_batch)
        assert isinstance(batched.non_tensor_batch["reward_model"], np.ndarray)


def _trainer_config(use_v1: bool):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer")
    OmegaConf.update(config, "trainer.use_v1", use_v1, force_add=True)
    return config


def test_the_cpu_default_for_the_v1_trainer_is_the_batched_manager_which_verl_can_load():
    from verl.trainer.ppo.v1 import AgentLoopManagerTQ
    from verl.utils.import_utils import load_class_from_fqn

    config = _trainer_config(use_v1=True)
    assert f"{MANAGER_KEY}={BATCHED_AGENT_LOOP_MANAGER}" in adapt_config_for_cpu(config, explicit_keys=set())
    manager = load_class_from_fqn(OmegaConf.select(config, MANAGER_KEY), "AgentLoopManager")
    assert issubclass(manager, AgentLoopManagerTQ)


def test_the_legacy_trainer_and_an_explicit_manager_keep_their_agent_loop():
    legacy = _trainer_config(use_v1=False)
    adapt_config_for_cpu(legacy, explicit_keys=set())
    assert OmegaConf.select(legacy, MANAGER_KEY) is None

    chosen = _trainer_config(use_v1=True)
    OmegaConf.update(chosen, MANAGER_KEY, "verl.trainer.ppo.v1.AgentLoopManagerTQ", force_add=True)
    adapt_config_for_cpu(chosen, explicit_keys={MANAGER_KEY})
    assert OmegaConf.select(chosen, MANAGER_KEY) == "verl.trainer.ppo.v1.AgentLoopManagerTQ"
