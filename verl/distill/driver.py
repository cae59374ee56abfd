"""Work done on the driver of ``python -m verl.trainer.main_ppo`` before Ray starts.

``check_command_line`` runs when verl-distill is loaded (see :mod:`verl.distill.compat`), before
Hydra composes the config: it refuses what Hydra would reject with a multi-line message of its own
(FSDP settings given to the Megatron config). ``prepare_trainer_config`` runs inside
``main_ppo.main`` on the composed config: it adapts the config to a CPU machine and validates
distillation settings. Either way a mistake is reported as one line naming the key and the fix,
with a non-zero exit, seconds after the command was typed instead of as a Ray traceback minutes later.
"""

import logging
import os
import sys
from typing import Optional

from omegaconf import DictConfig

from verl.distill.cpu_defaults import CPUConfigError, adapt_config_for_cpu, explicit_override_keys, override_keys
from verl.distill.cpu_platform import cpu_platform_active

logger = logging.getLogger(__name__)

CONFIG_ERROR_EXIT_CODE = 2
TRAINER_MODULE = "verl.trainer.main_ppo"
TRAINER_SCRIPT = os.path.join("verl", "trainer", "main_ppo.py")


def trainer_arguments(command: list[str]) -> Optional[list[str]]:
    """The arguments given to the trainer in an interpreter command line (``sys.orig_argv``):
    what follows ``-m verl.trainer.main_ppo`` or ``.../verl/trainer/main_ppo.py``; None for any other program."""
    for position, argument in enumerate(command):
        if argument == "-m":
            return command[position + 2 :] if command[position + 1 : position + 2] == [TRAINER_MODULE] else None
        if argument.endswith(TRAINER_SCRIPT):
            return command[position + 1 :]
    return None


def hydra_config_name_and_overrides(arguments: list[str]) -> tuple[Optional[str], list[str]]:
    """``--config-name`` (or ``-cn``) and the overrides (``key=value``, ``~key``) among Hydra's arguments."""
    config_name, overrides = None, []
    expects_name = False
    for argument in arguments:
        if expects_name:
            config_name, expects_name = argument, False
        elif argument in ("--config-name", "-cn"):
            expects_name = True
        elif argument.startswith("--config-name="):
            config_name = argument.split("=", 1)[1]
        elif not argument.startswith("-") and ("=" in argument or argument.startswith("~")):
            overrides.append(argument)
    return config_name, overrides


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _config_errors() -> tuple[type[Exception], ...]:
    from verl.distill.validation import DistillConfigError

    return (CPUConfigError, DistillConfigError)


def _exit_with_config_error(error: Exception) -> None:
    print(f"verl-distill: error: {error}", file=sys.stderr, flush=True)
    if trainer_arguments(sys.orig_argv) is None:
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    # Nothing has started yet; tearing down the interpreter (torch, transformers, Ray modules) would
    # take seconds longer than everything before it on a small machine.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(CONFIG_ERROR_EXIT_CODE)


def check_command_line() -> None:
    """In the trainer's driver process, refuse overrides Hydra cannot compose, before it tries."""
    arguments = trainer_arguments(sys.orig_argv)
    if arguments is None:
        return  # a Ray worker, a test, another program
    from verl.distill.validation import DistillConfigError, refuse_fsdp_settings_on_megatron

    config_name, overrides = hydra_config_name_and_overrides(arguments)
    try:
        refuse_fsdp_settings_on_megatron(config_name, override_keys(overrides))
    except DistillConfigError as error:
        _exit_with_config_error(error)


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
        _exit_with_config_error(error)
