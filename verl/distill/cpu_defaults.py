"""Adapt a verl trainer config to a machine without an accelerator.

On a CPU, verl 0.9.1's defaults cannot run: vLLM rollout, tensor parallel 2, FSDP1 (which syncs
module states on a GPU), flash-attention, Ray resource pools that ask for GPUs, and worker counts
(8 agent-loop, 8 reward, 8 storage units, 8 data loaders) sized for a GPU node. Each entry of
:data:`CPU_SETTINGS` is one such setting with the value that works on a CPU. A key the user set
explicitly on the command line is left alone where it can work; where it cannot, the user gets a
one-line error before Ray starts.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

ROLLOUT_BACKENDS_ON_CPU = ("hf",)

# named, not imported: importing it loads verl's trainer, too slow for a config check
BATCHED_AGENT_LOOP_MANAGER = "verl.distill.batched_agent_loop.BatchedAgentLoopManager"


@dataclass(frozen=True)
class CPUSetting:
    key: str
    value: Callable[[DictConfig], Any]
    why: str
    # Only rewrite when the current value is one of these (None: whatever it is).
    replaces: tuple = None


def _logical_gpus(config: DictConfig) -> int:
    return int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)


def _batched_agent_loop_manager(config: DictConfig) -> Optional[str]:
    # verl's v1 trainer reads its rollouts from TransferQueue, as the batched manager writes them;
    # the legacy trainer expects returned batches
    return BATCHED_AGENT_LOOP_MANAGER if OmegaConf.select(config, "trainer.use_v1", default=False) else None


CPU_SETTINGS: tuple[CPUSetting, ...] = (
    CPUSetting("trainer.device", lambda c: "cpu", "verl rewrites it to cuda otherwise"),
    CPUSetting("trainer.n_gpus_per_node", lambda c: 1, "one trainer process per machine", replaces=(8,)),
    CPUSetting("actor_rollout_ref.rollout.name", lambda c: "hf", "vLLM/SGLang need a GPU"),
    CPUSetting("actor_rollout_ref.rollout.tensor_model_parallel_size", lambda c: 1, "one process per replica"),
    CPUSetting("actor_rollout_ref.actor.strategy", lambda c: "fsdp2", "FSDP1 syncs weights on a GPU", replaces=("fsdp",)),
    CPUSetting("critic.strategy", lambda c: "fsdp2", "FSDP1 syncs weights on a GPU", replaces=("fsdp",)),
    CPUSetting(
        "actor_rollout_ref.model.override_config.attn_implementation",
        lambda c: "sdpa",
        "flash-attention needs a GPU",
    ),
    CPUSetting("critic.model.override_config.attn_implementation", lambda c: "sdpa", "flash-attention needs a GPU"),
    CPUSetting("ray_kwargs.ray_init.num_gpus", _logical_gpus, "verl's resource pools ask Ray for GPUs: logical ones"),
    CPUSetting(
        "ray_kwargs.ray_init.num_cpus",
        lambda c: 16,
        "verl's helper actors each reserve a CPU; logical CPUs let them schedule on a small machine",
        replaces=(None,),
    ),
    CPUSetting(
        "actor_rollout_ref.rollout.agent.agent_loop_manager_class",
        _batched_agent_loop_manager,
        "verl's v1 agent loop makes ~6 remote calls per sample; the batched one makes ~6 per step",
        replaces=(None,),
    ),
    CPUSetting("actor_rollout_ref.rollout.agent.num_workers", lambda c: 1, "each worker is a process holding torch", replaces=(8,)),
    CPUSetting("reward.num_workers", lambda c: 1, "each worker is a process holding torch", replaces=(8,)),
    CPUSetting("data.dataloader_num_workers", lambda c: 0, "forked loaders cost memory for tiny data", replaces=(8,)),
    CPUSetting(
        "transfer_queue.backend.SimpleStorage.num_data_storage_units",
        lambda c: 1,
        "each storage unit is an actor reserving a CPU",
        replaces=(8,),
    ),
)


class CPUConfigError(ValueError):
    """A setting the user chose explicitly cannot work on a CPU."""


def override_keys(overrides: list[str]) -> list[str]:
    """Config keys named by Hydra overrides (``key=v``, ``+key=v``, ``++key=v``, ``~key``), in order."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").strip()
        if key and not key.startswith("hydra."):
            keys.append(key)
    return keys


def explicit_override_keys(overrides: list[str]) -> set[str]:
    """Config keys named on the command line."""
    return set(override_keys(overrides))


def _select(config: DictConfig, key: str) -> tuple[bool, Any]:
    missing = object()
    value = OmegaConf.select(config, key, default=missing)
    return value is not missing, (None if value is missing else value)


def adapt_config_for_cpu(config: DictConfig, explicit_keys: set[str]) -> list[str]:
    """Rewrite ``config`` in place for a CPU machine; return ``key=value`` for every change made."""
    explicit_rollout, rollout_name = _select(config, "actor_rollout_ref.rollout.name")
    if "actor_rollout_ref.rollout.name" in explicit_keys and rollout_name not in ROLLOUT_BACKENDS_ON_CPU:
        raise CPUConfigError(
            f"actor_rollout_ref.rollout.name={rollout_name} needs a GPU and this machine has none; "
            f"fix: use actor_rollout_ref.rollout.name=hf (or drop the override) to train on the CPU"
        )
    changes = []
    for setting in CPU_SETTINGS:
        if setting.key in explicit_keys:
            continue
        exists, current = _select(config, setting.key)
        parent_key = setting.key.rsplit(".", 1)[0]
        if not exists and OmegaConf.select(config, parent_key) is None:
            continue  # the node this setting belongs to is not part of this config (e.g. no critic)
        if setting.replaces is not None and current not in setting.replaces:
            continue
        value = setting.value(config)
        if exists and current == value:
            continue
        with open_dict(config):
            OmegaConf.update(config, setting.key, value, force_add=True)
        changes.append(f"{setting.key}={value}")
    return changes
