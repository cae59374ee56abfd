"""The Ray side of on/off-policy mixing (:mod:`verl.distill.policy_mixing`), at two of verl's extension points.

The driver installs both only when ``data.on_policy_lambda`` < 1
(:func:`verl.distill.policy_mixing.route_through_mixing`); a run with λ = 1 keeps verl's classes.

* :class:`MixedPolicyAgentLoopManager`, :class:`BatchedMixedPolicyAgentLoopManager`
  (``actor_rollout_ref.rollout.agent.agent_loop_manager_class``): verl's v1 agent-loop manager (the
  batched one of a CPU job). On an off-policy step it replaces the prompts the trainer drew from the
  training file by the step's rows of ``data.off_policy_files`` (read by verl's RL dataset class, like
  the training file), keeps the uids the trainer registered for them, and routes them to the
  ``distill_dataset_response`` agent loop (:mod:`verl.distill.dataset_response_agent_loop`): no sample
  is generated. The training prompts drawn for that step are not used. On-policy steps and validation
  batches pass through unchanged.
* :class:`MixedPolicyReplayBuffer` (``trainer.v1.sampler.custom_sampler``): verl's replay buffer,
  which also reports ``data/is_on_policy`` (1.0 or 0.0) in each training step's metrics.
"""

import numpy as np
from tensordict import TensorDict

from verl.distill.batched_agent_loop import BatchedAgentLoopManager
from verl.distill.policy_mixing import (
    DATASET_RESPONSE_AGENT_LOOP,
    PolicySchedule,
    off_policy_files,
    schedule_from_sampler_kwargs,
)
from verl.trainer.ppo.utils import create_rl_dataset
from verl.trainer.ppo.v1 import replay_buffer
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.dataset.rl_dataset import collate_fn

IS_ON_POLICY_METRIC = "data/is_on_policy"


class _OffPolicySteps:
    """What the mixing managers add to the agent-loop manager they extend (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._schedule = PolicySchedule.from_config(self.config)
        model_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.model)
        self._off_policy_rows = create_rl_dataset(
            off_policy_files(self.config), self.config.data, model_config.tokenizer, model_config.processor
        )
        if len(self._off_policy_rows) == 0:
            raise ValueError("data.off_policy_files: no row is left after verl's dataset filters (overlong prompts)")
        self._batch_size = int(self.config.data.train_batch_size)
        # rows handed out so far for the current step: a step's prompts may arrive in several chunks
        self._step_rows = (None, 0)

    def generate_sequences(self, prompts: TensorDict):
        step = tu.get_non_tensor_data(prompts, "global_steps", None)
        if tu.get_non_tensor_data(prompts, "validate", False) or self._schedule.is_on_policy(step):
            return super().generate_sequences(prompts)
        return super().generate_sequences(self._off_policy_prompts(prompts, step))

    def _off_policy_prompts(self, prompts: TensorDict, step: int) -> TensorDict:
        count = len(prompts)
        handed_out = self._step_rows[1] if self._step_rows[0] == step else 0
        first = self._schedule.off_policy_steps_before(step) * self._batch_size + handed_out
        rows = self._schedule.off_policy_rows(first, count, len(self._off_policy_rows))
        self._step_rows = (step, handed_out + count)

        batch = collate_fn([self._off_policy_rows[row] for row in rows])
        batch["uid"] = np.array(list(prompts["uid"]), dtype=object)
        batch["agent_name"] = np.array([DATASET_RESPONSE_AGENT_LOOP] * count, dtype=object)
        off_policy = tu.get_tensordict(batch)
        tu.assign_non_tensor_data(off_policy, "global_steps", step)
        return off_policy


class MixedPolicyAgentLoopManager(_OffPolicySteps, AgentLoopManagerTQ):
    """verl's v1 agent-loop manager, with off-policy steps answered from ``data.off_policy_files``."""


class BatchedMixedPolicyAgentLoopManager(_OffPolicySteps, BatchedAgentLoopManager):
    """verl-distill's batched agent-loop manager (CPU jobs), with off-policy steps answered from the dataset."""


# the module's ReplayBuffer at import time: in a CPU job, the promptly polled one (verl.distill.compat)
class MixedPolicyReplayBuffer(replay_buffer.ReplayBuffer):
    """verl's synchronous replay buffer; each training step's metrics also say whether it was on-policy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._schedule = schedule_from_sampler_kwargs(self.sampler_kwargs)

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        if partition_id != "val":
            metrics = {**metrics, IS_ON_POLICY_METRIC: float(self._schedule.is_on_policy(global_steps))}
        return batch, metrics
