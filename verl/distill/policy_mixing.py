"""On/off-policy mixing (GKD's lambda): which steps learn from the student's samples, which from a dataset.

With ``data.on_policy_lambda`` = λ in [0, 1], training step s is **on-policy** (the student generates,
as in every other verl-distill run) when u(s) < λ, and **off-policy** otherwise: its prompts and
responses are rows of ``data.off_policy_files`` (ground truth, or text a teacher wrote), which the
teacher scores and the same loss trains on. u(s) is a uniform draw seeded by ``(data.seed, s)``
(0 for a null ``data.seed``), so the schedule is a pure function of the seed and the step: a run, its
resume and its metrics agree on it without any saved state, and the on-policy and off-policy steps
are two disjoint sets whose sizes are about λ and 1 - λ of the run.

The partition is of **steps**, not of prompts within a step: an off-policy step skips the student's
generation entirely, which is what λ < 1 saves; verl's trainer decides some things per step (whether
the rollout's log-probs stand in for the old log-probs), so one kind of sample per step keeps each
step an ordinary verl step; and ``data/is_on_policy`` (1.0 or 0.0 per step) averages to λ.

The k-th off-policy step of a run (k = 0, 1, ...) takes the next ``data.train_batch_size`` rows of the
off-policy file read in passes: row positions [k·B, (k+1)·B) of pass after pass, each pass in an
order shuffled by ``(data.seed, pass)`` when ``data.shuffle`` (else in file order). Every row is used
once per pass; like the schedule, the rows of a step depend only on the seed and the step.

This module is what the driver needs before Ray starts (the settings, the schedule, how a config is
routed through the mixing classes); :mod:`verl.distill.off_policy_rollout` holds the Ray side.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

LAMBDA_KEY = "data.on_policy_lambda"
FILES_KEY = "data.off_policy_files"
RESPONSE_KEY_KEY = "data.off_policy_response_key"

MANAGER_KEY = "actor_rollout_ref.rollout.agent.agent_loop_manager_class"
SAMPLER_PATH_KEY = "trainer.v1.sampler.custom_sampler.path"
SAMPLER_NAME_KEY = "trainer.v1.sampler.custom_sampler.name"
SAMPLER_KWARGS_KEY = "trainer.v1.sampler.sampler_kwargs"

# verl's agent-loop managers that the mixing managers extend (named: importing them loads verl's trainer)
VERL_AGENT_LOOP_MANAGERS = (
    "verl.trainer.ppo.v1.agent_loop_tq.AgentLoopManagerTQ",
    "verl.trainer.ppo.v1.AgentLoopManagerTQ",
)
BATCHED_AGENT_LOOP_MANAGER = "verl.distill.batched_agent_loop.BatchedAgentLoopManager"
_ROLLOUT_MODULE = "verl.distill.off_policy_rollout"
MIXED_POLICY_MANAGERS = {
    **{manager: f"{_ROLLOUT_MODULE}.MixedPolicyAgentLoopManager" for manager in (None, *VERL_AGENT_LOOP_MANAGERS)},
    BATCHED_AGENT_LOOP_MANAGER: f"{_ROLLOUT_MODULE}.BatchedMixedPolicyAgentLoopManager",
}
MIXED_POLICY_REPLAY_BUFFER = (f"pkg://{_ROLLOUT_MODULE}", "MixedPolicyReplayBuffer")

# the agent loop answering an off-policy step's rows, in verl's agent-loop registry
DATASET_RESPONSE_AGENT_LOOP = "distill_dataset_response"
DATASET_RESPONSE_AGENT_LOOP_CLASS = "verl.distill.dataset_response_agent_loop.DatasetResponseAgentLoop"


def _select(config: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(config, key, default=default)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def off_policy_files(config: DictConfig) -> list[str]:
    files = _select(config, FILES_KEY)
    if files is None:
        return []
    return [files] if isinstance(files, str) else [str(file) for file in files]


@dataclass(frozen=True)
class PolicySchedule:
    """Which steps are on-policy, and which rows of the off-policy file each off-policy step takes."""

    on_policy_lambda: float
    seed: int
    shuffle: bool = True
    # _off_policy_counts[i]: off-policy steps among 1 .. i, extended as later steps are asked about
    _off_policy_counts: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)

    @classmethod
    def from_config(cls, config: DictConfig) -> "PolicySchedule":
        seed = _select(config, "data.seed")
        return cls(
            on_policy_lambda=float(_select(config, LAMBDA_KEY, 1.0)),
            seed=0 if seed is None else int(seed),
            shuffle=bool(_select(config, "data.shuffle", True)),
        )

    def is_on_policy(self, step: int) -> bool:
        # random() lies in [0, 1): lambda 1 is always on-policy, lambda 0 never
        return bool(np.random.default_rng([self.seed, step]).random() < self.on_policy_lambda)

    def off_policy_steps_before(self, step: int) -> int:
        """How many of the steps 1 .. step - 1 are off-policy: the index k of step ``step`` among them."""
        counts = self._off_policy_counts
        while len(counts) < step:
            counts.append(counts[-1] + (not self.is_on_policy(len(counts))))
        return counts[step - 1]

    def off_policy_rows(self, first_position: int, count: int, num_rows: int) -> list[int]:
        """Rows at positions [first_position, first_position + count) of the file read pass after pass."""
        rows = []
        for position in range(first_position, first_position + count):
            epoch, offset = divmod(position, num_rows)
            rows.append(int(self._pass_order(epoch, num_rows)[offset]))
        return rows

    def _pass_order(self, epoch: int, num_rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(num_rows)


def mixes_policies(config: DictConfig) -> bool:
    """Whether some steps of this run are off-policy (``data.on_policy_lambda`` < 1)."""
    value = _select(config, LAMBDA_KEY, 1.0)
    return isinstance(value, int | float) and not isinstance(value, bool) and value < 1.0


def route_through_mixing(config: DictConfig) -> list[str]:
    """For a run with λ < 1: the agent-loop manager that swaps an off-policy step's prompts for rows of
    the off-policy file, and the replay buffer that logs ``data/is_on_policy``; ``key=value`` of each
    change. Call after :func:`verl.distill.validation.validate_distillation_config` (which refuses a
    manager or sampler of the user's own)."""
    if not mixes_policies(config):
        return []
    schedule = PolicySchedule.from_config(config)
    changes = {
        MANAGER_KEY: MIXED_POLICY_MANAGERS[_select(config, MANAGER_KEY)],
        SAMPLER_PATH_KEY: MIXED_POLICY_REPLAY_BUFFER[0],
        SAMPLER_NAME_KEY: MIXED_POLICY_REPLAY_BUFFER[1],
        # the replay buffer is built from the trainer.v1.sampler node only
        f"{SAMPLER_KWARGS_KEY}.on_policy_lambda": schedule.on_policy_lambda,
        f"{SAMPLER_KWARGS_KEY}.policy_schedule_seed": schedule.seed,
    }
    with open_dict(config):
        for key, value in changes.items():
            OmegaConf.update(config, key, value, force_add=True)
    return [f"{key}={value}" for key, value in changes.items()]


def schedule_from_sampler_kwargs(sampler_kwargs: Optional[dict]) -> PolicySchedule:
    """The schedule :func:`route_through_mixing` handed to the replay buffer."""
    sampler_kwargs = sampler_kwargs or {}
    return PolicySchedule(
        on_policy_lambda=float(sampler_kwargs["on_policy_lambda"]), seed=int(sampler_kwargs["policy_schedule_seed"])
    )
