"""A ``cpu`` platform for verl's platform registry: train with gloo on machines without an accelerator.

verl 0.9.1 knows only accelerator platforms and falls back to ``nvidia`` on a CPU machine, which
ends in "Distributed package doesn't have NCCL built in". This platform is selected only with
``VERL_PLATFORM=cpu``, never by verl's per-process auto-detection: a process without an accelerator
is not a CPU job (the driver of a GPU job on a CPU head node, a reward worker on a CPU-only node).
The trainer's driver decides whether the run is a CPU job (:mod:`verl.distill.cpu_job`) and hands
``VERL_PLATFORM=cpu`` to every Ray process of that job.

verl calls ``get_torch_device().<fn>`` for memory statistics, RNG state, streams and cache
control; :class:`CPUDeviceModule` answers those calls the way a single-device accelerator with
nothing to free or synchronise would.
"""

from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Any, Optional

import psutil
import torch

from verl.plugin.platform import PlatformBase, PlatformRegistry


class CPUDeviceModule:
    """The subset of the ``torch.cuda`` API that verl uses, answered for host memory."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device: Any) -> None:
        pass

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def ipc_collect() -> None:
        pass

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        pass

    # Host memory stands in for device memory: verl logs these as actor/perf/*memory*.
    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return psutil.Process().memory_info().rss

    memory_reserved = memory_allocated

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        # ru_maxrss is in KiB on Linux.
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    max_memory_reserved = max_memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        pass

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    # CPU work is synchronous: streams and events only need to exist and be waitable.
    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def synchronize(self) -> None:
            pass

        def wait_stream(self, other: Any) -> None:
            pass

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, stream: Any = None) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def wait(self, stream: Any = None) -> None:
            pass

    @staticmethod
    def current_stream(device: Any = None) -> "CPUDeviceModule.Stream":
        return CPUDeviceModule.Stream()

    @staticmethod
    def stream(stream: Any = None):
        return nullcontext()

    memory = SimpleNamespace(_set_allocator_settings=lambda settings: None)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """Host CPU as verl's device: gloo collectives, Ray's ``GPU`` resource as a scheduling token.

    Keeping Ray's resource name ``GPU`` means verl's resource pools (which always request GPUs)
    schedule unchanged; on a CPU machine Ray is started with logical GPUs (see
    :mod:`verl.distill.cpu_defaults`).
    """

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> CPUDeviceModule:
        return CPUDeviceModule

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Only VERL_PLATFORM=cpu selects this platform (see the module docstring).
        return False

    def current_device(self) -> str:
        # verl moves tensors with `.to(get_device_id())`: an int would mean an accelerator index.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets this for actors holding logical GPUs; nothing reads it on a CPU.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
