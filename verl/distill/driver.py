"""Work done on the driver between composing the trainer config and starting Ray.

``prepare_trainer_config`` runs inside ``main_ppo.main`` (see :mod:`verl.distill.compat`): it adapts
the config to a CPU machine and validates distillation settings, so that a mistake is reported as
one line naming the key and the fix, with a non-zero exit, seconds after the command was typed
instead of as a Ray traceback minutes later.
"""

import logging
import sys

from omegaconf import DictConfig

from verl.distill.cpu_defaults import CPUConfigError, adapt_config_for_cpu, explicit_override_keys
from verl.distill.cpu_platform import cpu_platform_active

logger = logging.getLogger(__name__)

CONFIG_ERROR_EXIT_CODE = 2


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _config_errors() -> tuple[type[Exception], ...]:
    from verl.distill.validation import DistillConfigError

    return (CPUConfigError, DistillConfigError)


def prepare_trainer_config(config: DictConfig) -> None:
    if not isinstance(config, DictConfig) or "actor_rollout_ref" not in config:
        return  # not a trainer config (e.g. a generation or evaluation script)
    try:
        if cpu_platform_active():
            changes = adapt_config_for_cpu(config, explicit_override_keys(_command_line_overrides()))
            if changes:
                logger.warning(
                    "verl-distill: no accelerator found, adapted the config for the CPU: %s "
                    "(set any of these explicitly to override)",
                    ", ".join(changes),
                )
        from verl.distill.validation import validate_distillation_config

        validate_distillation_config(config)
    except _config_errors() as error:
        print(f"verl-distill: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
