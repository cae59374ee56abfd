"""Whether a trainer run is a CPU job: decided once, on the driver, and handed to every Ray process.

A process that sees no accelerator is not evidence of a CPU job: the driver of a GPU job submitted
from a CPU head node (KubeRay, ``ray job submit``) and the reward or agent-loop actors of a GPU job
on CPU-only nodes see none either. The CPU backend therefore switches on only when

1. ``VERL_PLATFORM=cpu`` is set (``VERL_PLATFORM=<anything else>`` switches it off), or
2. the config says ``trainer.device=cpu``, or
3. nothing points at GPUs: no accelerator here, no GPU in the Ray cluster the run would join, and no
   GPU rollout backend or accelerator device named on the command line.

A command line that names a GPU rollout or device on a machine without an accelerator, joining no
Ray cluster, cannot work (verl would start a local Ray without GPUs): it is refused in one line.

The driver then sets ``VERL_PLATFORM=cpu`` in its own environment and in the Ray job's
``runtime_env``, so every process of the job resolves verl's platform to ``cpu``
(:mod:`verl.distill.cpu_platform`), and no other process does.
"""

import logging
import os
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from verl.distill.cpu_defaults import ROLLOUT_BACKENDS_ON_CPU, CPUConfigError

logger = logging.getLogger(__name__)

PLATFORM_ENV = "VERL_PLATFORM"
CPU_PLATFORM = "cpu"
RUNTIME_ENV_VARS_KEY = "ray_kwargs.ray_init.runtime_env.env_vars"


def cpu_platform_active() -> bool:
    """True in every process of a CPU job: ``VERL_PLATFORM=cpu``, the only way verl resolves its
    platform to ``cpu``. Read from the environment, so asking resolves no platform early."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == CPU_PLATFORM


def accelerator_present() -> bool:
    """True when torch sees a CUDA/ROCm GPU or an Ascend NPU in this process."""
    import torch

    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


@dataclass(frozen=True)
class CPUJobDecision:
    is_cpu_job: bool
    reason: str


def _ray_cluster_to_join(config: DictConfig) -> Optional[str]:
    """The address of the running Ray cluster verl's ``ray.init`` would connect to, or None when it
    would start a local one (same lookup as Ray: the configured address, ``RAY_ADDRESS``, the last
    ``ray start`` on this machine)."""
    from ray._private.services import canonicalize_bootstrap_address

    address = OmegaConf.select(config, "ray_kwargs.ray_init.address", default=None)
    return canonicalize_bootstrap_address(address)


def ray_cluster_gpus(address: str) -> float:
    """GPUs registered in the Ray cluster at ``address``: a short-lived connection, closed again so
    that verl's own ``ray.init`` (with its runtime_env) runs as usual."""
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return float(ray.cluster_resources().get("GPU", 0))
    finally:
        ray.shutdown()


def _gpu_requests_on_command_line(config: DictConfig, explicit_keys: set[str]) -> list[str]:
    requests = []
    if "actor_rollout_ref.rollout.name" in explicit_keys:
        rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.name")
        if rollout not in ROLLOUT_BACKENDS_ON_CPU:
            requests.append(f"actor_rollout_ref.rollout.name={rollout}")
    if "trainer.device" in explicit_keys:
        requests.append(f"trainer.device={OmegaConf.select(config, 'trainer.device')}")
    return requests


def decide_cpu_job(config: DictConfig, explicit_keys: set[str]) -> CPUJobDecision:
    """Whether this run is a CPU job, and why (see the module docstring for the rule); raises
    :class:`CPUConfigError` for a command line that cannot run here."""
    platform = os.environ.get(PLATFORM_ENV, "").strip().lower()
    if platform:
        return CPUJobDecision(platform == CPU_PLATFORM, f"{PLATFORM_ENV}={platform}")
    if OmegaConf.select(config, "trainer.device") == CPU_PLATFORM:
        return CPUJobDecision(True, "trainer.device=cpu")
    if accelerator_present():
        return CPUJobDecision(False, "an accelerator is visible")
    requests = _gpu_requests_on_command_line(config, explicit_keys)
    address = _ray_cluster_to_join(config)
    if requests and address is None:
        raise CPUConfigError(
            f"{', '.join(requests)} needs a GPU, and this machine has none and joins no Ray cluster; fix: add "
            "trainer.device=cpu to train on the CPU (hf rollout), or run on a GPU machine or a Ray cluster with "
            "GPUs (RAY_ADDRESS)"
        )
    if requests:
        return CPUJobDecision(False, f"the command line asks for GPUs ({', '.join(requests)})")
    if address is not None:
        try:
            gpus = ray_cluster_gpus(address)
        except Exception as error:  # verl's own ray.init will report an unreachable cluster
            return CPUJobDecision(False, f"the Ray cluster at {address} could not be asked for GPUs ({error})")
        if gpus > 0:
            return CPUJobDecision(False, f"the Ray cluster at {address} has {gpus:g} GPUs")
        return CPUJobDecision(True, f"no accelerator here and none in the Ray cluster at {address}")
    return CPUJobDecision(True, "no accelerator here, no Ray cluster to join, no GPU asked for")


def activate_cpu_platform(config: DictConfig) -> None:
    """Make this process and every process of the Ray job resolve verl's platform to ``cpu``."""
    from verl.distill.cpu_platform import PlatformCPU
    from verl.plugin.platform import get_platform, set_platform

    os.environ[PLATFORM_ENV] = CPU_PLATFORM
    set_job_env_var(config, PLATFORM_ENV, CPU_PLATFORM)
    if get_platform().device_name != CPU_PLATFORM:
        # resolved before this decision (e.g. by an import that read the device name)
        set_platform(PlatformCPU())


def set_job_env_var(config: DictConfig, name: str, value: str) -> None:
    """Set ``name`` in the Ray job's runtime_env, which verl's ``run_ppo`` passes to ``ray.init``
    and Ray to the TaskRunner and every worker it starts."""
    with open_dict(config):
        OmegaConf.update(config, f"{RUNTIME_ENV_VARS_KEY}.{name}", value, force_add=True)
