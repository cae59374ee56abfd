"""Work done on the driver of ``python -m verl.trainer.main_ppo`` before Ray starts.

``check_command_line`` runs when verl-distill is loaded (see :mod:`verl.distill.compat`), before
Hydra composes the config: it refuses what Hydra would reject with a multi-line message of its own
(FSDP settings given to the Megatron config). Inside ``main_ppo.main``, on the composed config,
``choose_platform`` decides whether the run is a CPU job (:mod:`verl.distill.cpu_job`) before verl
resolves its device, and ``prepare_trainer_config`` adapts a CPU job's config, marks a distillation
run for every Ray process of the job (:func:`verl.distill.compat.distillation_run`; a LoRA student
with a separate teacher too, :func:`verl.distill.lora_teacher.lora_teacher_run`) and validates
distillation settings. Either way a mistake is reported as one line naming the key and the fix,
with a non-zero exit, seconds after the command was typed instead of as a Ray traceback minutes later.
"""

import logging
import os
import sys
from typing import Optional

from omegaconf import DictConfig

from verl.distill.cpu_defaults import CPUConfigError, adapt_config_for_cpu, explicit_override_keys, override_keys
from verl.distill.cpu_job import accelerator_present, cpu_platform_active

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
    from verl.distill.checkpoints import ResumeError
    from verl.distill.validation import DistillConfigError

    return (CPUConfigError, DistillConfigError, ResumeError)


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


def _is_trainer_config(config) -> bool:
    # not a trainer config: a generation or evaluation script calling auto_set_device
    return isinstance(config, DictConfig) and "actor_rollout_ref" in config


def choose_platform(config: DictConfig) -> None:
    """Switch the CPU backend on for a CPU job, in this process and every Ray process of the job."""
    if not _is_trainer_config(config):
        return
    from verl.distill.cpu_job import PLATFORM_ENV, activate_cpu_platform, decide_cpu_job

    try:
        decision = decide_cpu_job(config, explicit_override_keys(_command_line_overrides()))
    except CPUConfigError as error:
        _exit_with_config_error(error)
    if decision.is_cpu_job:
        activate_cpu_platform(config)
    elif not accelerator_present() and not os.environ.get(PLATFORM_ENV):
        logger.warning(
            "verl-distill: no accelerator on this machine, but %s: the config is left as it is "
            "(add trainer.device=cpu to run this job on the CPU)",
            decision.reason,
        )


# what on a trainer's command line asks for distillation or the CPU backend, verl's config untouched
DISTILLATION_CONFIG_PREFIX = "distillation"
DISTILLATION_OVERRIDES = ("actor_rollout_ref.ref.model.", "actor_rollout_ref.actor.distill.")
DISTILLATION_SETTINGS = ("reward.reward_manager.name=distillation",)
CPU_SETTINGS_ON_COMMAND_LINE = ("trainer.device=cpu",)


def _asks_for_verl_distill(config_name: Optional[str], overrides: list[str]) -> Optional[str]:
    if os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu":
        return "VERL_PLATFORM=cpu"
    if config_name and config_name.startswith(DISTILLATION_CONFIG_PREFIX):
        return f"--config-name={config_name}"
    for override in overrides:
        setting = override.lstrip("+~")
        if setting.startswith(DISTILLATION_OVERRIDES) or setting in DISTILLATION_SETTINGS + CPU_SETTINGS_ON_COMMAND_LINE:
            return setting
    return None


def refuse_unsupported_verl(version: str) -> None:
    """On a verl verl-distill was not written for: stop the trainer's driver of a run that asks for
    distillation or the CPU backend, with one line; anything else runs as stock verl."""
    from verl.distill.compat import unsupported_verl_message

    arguments = trainer_arguments(sys.orig_argv)
    if arguments is None:
        return
    asked_by = _asks_for_verl_distill(*hydra_config_name_and_overrides(arguments))
    if asked_by is not None:
        _exit_with_config_error(ValueError(f"{asked_by} needs verl-distill, but {unsupported_verl_message(version)}"))


def prepare_trainer_config(config: DictConfig) -> None:
    if not _is_trainer_config(config):
        return
    try:
        if cpu_platform_active():
            changes = adapt_config_for_cpu(config, explicit_override_keys(_command_line_overrides()))
            if changes:
                logger.warning(
                    "verl-distill: CPU job, adapted the config for the CPU: %s "
                    "(set any of these explicitly to override)",
                    ", ".join(changes),
                )
        from verl.distill.validation import selects_distillation, validate_distillation_config

        validate_distillation_config(config)
        if selects_distillation(config):
            _mark_distillation_run(config)
            _route_through_policy_mixing(config)
        if selects_distillation(config) or cpu_platform_active():
            _check_resumable(config)
    except _config_errors() as error:
        _exit_with_config_error(error)


def _route_through_policy_mixing(config: DictConfig) -> None:
    from verl.distill.policy_mixing import route_through_mixing

    changes = route_through_mixing(config)
    if changes:
        logger.warning("verl-distill: on/off-policy mixing, set %s", ", ".join(changes))


def _check_resumable(config: DictConfig) -> None:
    """verl-distill's resume rule (:mod:`verl.distill.checkpoints`) applies to this run: an error it
    would raise in the TaskRunner is raised here, as one line, when the driver sees the folder."""
    from verl.distill.checkpoints import ResumeError, resume_problem

    problem = resume_problem(config)
    if problem is not None:
        raise ResumeError(problem)


def _mark_distillation_run(config: DictConfig) -> None:
    from verl.distill.compat import DISTILLATION_RUN_ENV, RESPONSE_SELECTION_ENV
    from verl.distill.cpu_job import set_job_env_var
    from verl.distill.lora_teacher import LORA_TEACHER_RUN_ENV, separate_teacher_for_lora_student
    from verl.distill.selective_teacher import selection_options

    marks = {DISTILLATION_RUN_ENV: "1"}
    if separate_teacher_for_lora_student(config.actor_rollout_ref.model, config.actor_rollout_ref.ref.get("model")):
        marks[LORA_TEACHER_RUN_ENV] = "1"
    strategy, _ = selection_options(config)
    if strategy != "all":
        marks[RESPONSE_SELECTION_ENV] = strategy
    for mark, value in marks.items():
        os.environ[mark] = value
        set_job_env_var(config, mark, value)
