"""Checks of a distillation config on the driver, before Ray starts.

A distillation mistake otherwise shows up minutes later inside a Ray worker, or never: a teacher with
another tokenizer, or a LoRA setting verl's FSDP engine ignores, trains without an error against a
meaningless target.
:func:`validate_distillation_config` raises :class:`DistillConfigError`, one line naming the key (or
file) and the fix. It checks only configs that select distillation (a distillation loss mode, the
``distillation`` reward manager, or a teacher in ``actor_rollout_ref.ref.model.path``); the rest is left to
verl. Cheap checks run first; those that load the tokenizers (the tokenizer comparison, ``distill.topk``
against the vocabulary, the prompt lengths of the first rows) last. A model or data location the
driver cannot open (a hub id, ``hdfs://``, ``s3://``) is let through with a warning: only the workers
may see it.

:func:`refuse_fsdp_settings_on_megatron` checks the command line before Hydra composes it: Hydra
rejects an FSDP key given to the Megatron config with a multi-line message of its own.
"""

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from verl.distill import policy_mixing
from verl.distill.teacher import (
    TEACHER_MODEL_KEYS,
    TEACHER_PATH_KEY,
    TEACHER_REF_TARGETS,
    TokenizerMismatchError,
    check_tokenizers_match,
    student_lora_setting,
    unknown_teacher_model_keys,
)

logger = logging.getLogger(__name__)

DISTILLATION_REWARD_MANAGER = "distillation"

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
REWARD_MANAGER_KEY = "reward.reward_manager.name"

KL_LOSS_TYPE_KEY = "actor_rollout_ref.actor.kl_loss_type"
# verl's kl_penalty estimators (a trailing "+" keeps the value and takes k2's gradient), for a
# policy loss of verl's next to the zero rewards; the distillation losses accept their own subset.
VERL_KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

DATA_FILE_KEYS = ("data.train_files", "data.val_files")
DATA_FORMATS = (".parquet", ".json", ".jsonl")
# with the data.*_max_samples key that limits each split to its first rows
DATA_SPLITS = (("data.train_files", "data.train_max_samples"), ("data.val_files", "data.val_max_samples"))
# Prompts rendered and tokenized per batch: large enough for batch tokenization, small enough to stop
# soon after the first prompt that is too long.
PROMPT_BATCH_ROWS = 4096
# Prompts measured per data split on the driver (the first rows): a few seconds of tokenizing, where a
# multi-million-row file would take minutes before Ray even starts.
PROMPT_CHECK_ROWS = 20_000

_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DistillConfigError(ValueError):
    """A distillation setting that cannot work: which key or file, what is wrong, how to fix it."""

    def __init__(self, key: str, problem: str, fix: str):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(" ".join(f"{key}: {problem}; fix: {fix}".split()))


def _get(config: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(config, key, default=default, throw_on_missing=False)
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def selects_distillation(config: DictConfig) -> bool:
    from verl.workers.roles.utils.loss_registry import is_distillation_mode

    return (
        is_distillation_mode(str(_get(config, LOSS_MODE_KEY)))
        or _get(config, REWARD_MANAGER_KEY) == DISTILLATION_REWARD_MANAGER
        or bool(_get(config, TEACHER_PATH_KEY))
    )


def validate_distillation_config(config: DictConfig) -> None:
    """Raise :class:`DistillConfigError` for the first distillation setting that cannot work."""
    if not selects_distillation(config):
        return
    _check_engine_settings(config)
    _check_teacher_slot(config)
    _check_lora_student(config)
    _check_loss(config)
    _check_distill_options(config)
    _check_rewards_and_advantages(config)
    _check_response_selection(config)
    for key in DATA_FILE_KEYS:
        _check_data_files(config, key)
    _check_policy_mixing(config)
    _check_model_folders(config)
    _check_tokenizers(config)
    tokenizer = _student_tokenizer(config)
    if tokenizer is None:
        return  # remote: verl copies it to local disk in the workers
    _check_topk(config, tokenizer)
    _check_prompt_lengths(config, tokenizer)
    _warn_of_cut_off_policy_responses(config, tokenizer)


# --- FSDP settings on the Megatron config ---------------------------------------------------------

MEGATRON_CONFIG_NAME = "distillation_megatron_trainer"
FSDP_CONFIG_NAME = "distillation_trainer"

# The node of verl's FSDP engine settings under each model role; Megatron's is ``<role>.megatron``.
FSDP_ENGINE_NODES = {"actor_rollout_ref.actor": "fsdp_config", "actor_rollout_ref.ref": "fsdp_config", "critic": "fsdp"}
# verl's FSDP engine settings (engine/fsdp.yaml) that its Megatron engine config (engine/megatron.yaml)
# has under the same name, and those it names differently.
SHARED_ENGINE_SETTINGS = (
    "param_offload",
    "optimizer_offload",
    "dtype",
    "seed",
    "forward_only",
    "pad_to_length",
    "pad_to_length_bucket",
    "entropy_from_logits_with_chunking",
    "entropy_from_logits_chunk_size",
    "qat",
)
RENAMED_ENGINE_SETTINGS = {"ulysses_sequence_parallel_size": "context_parallel_size", "offload_policy": "param_offload"}
# Settings of verl's FSDP role configs (dp_actor, dp_ref, dp_critic, optim/fsdp) outside the engine
# node that its Megatron role configs lack, relative to the role, with Megatron's counterpart (None: none).
FSDP_ROLE_SETTINGS = {
    "ulysses_sequence_parallel_size": "megatron.context_parallel_size",
    "use_remove_padding": "megatron.use_remove_padding",
    "pad_to_length": "megatron.pad_to_length",
    "entropy_checkpointing": None,
    "grad_clip": "optim.clip_grad",
    "forward_micro_batch_size": None,
    "forward_micro_batch_size_per_gpu": None,
    "optim.lr_scheduler_type": "optim.lr_decay_style",
    "optim.warmup_style": "optim.lr_decay_style",
    "optim.min_lr_ratio": "optim.min_lr",
    "optim.num_cycles": None,
    "optim.zero_indexed_step": None,
    "optim.optimizer_impl": None,
}


@dataclass(frozen=True)
class FSDPSetting:
    """A key of verl's FSDP configs, and its counterpart in the Megatron config (None: there is none)."""

    key: str
    megatron_key: Optional[str]


def fsdp_only_setting(key: str) -> Optional[FSDPSetting]:
    """The FSDP setting ``key`` names, or None if the Megatron config can hold it."""
    for role, engine_node in FSDP_ENGINE_NODES.items():
        if not key.startswith(f"{role}."):
            continue
        relative = key[len(role) + 1 :]
        if relative == engine_node:
            return FSDPSetting(key, f"{role}.megatron")
        if relative.startswith(f"{engine_node}."):
            name, _, rest = relative[len(engine_node) + 1 :].partition(".")
            megatron_name = name if name in SHARED_ENGINE_SETTINGS else RENAMED_ENGINE_SETTINGS.get(name)
            if megatron_name is None:
                return FSDPSetting(key, None)
            return FSDPSetting(key, ".".join(filter(None, (f"{role}.megatron.{megatron_name}", rest))))
        for fsdp_key, megatron_key in FSDP_ROLE_SETTINGS.items():
            if relative == fsdp_key or relative.startswith(f"{fsdp_key}."):
                return FSDPSetting(key, megatron_key and f"{role}.{megatron_key}")
    return None


def _fsdp_setting_error(setting: FSDPSetting) -> DistillConfigError:
    counterpart = f"use {setting.megatron_key}" if setting.megatron_key else "remove it (Megatron has no counterpart)"
    return DistillConfigError(
        setting.key,
        f"is an FSDP setting, and --config-name={MEGATRON_CONFIG_NAME} trains with Megatron",
        f"{counterpart}, or train with FSDP: --config-name={FSDP_CONFIG_NAME}",
    )


def refuse_fsdp_settings_on_megatron(config_name: Optional[str], override_keys: list[str]) -> None:
    """Refuse FSDP keys given on the command line to the Megatron config, before Hydra composes it
    (which would reject a key the config lacks with a multi-line message)."""
    if config_name != MEGATRON_CONFIG_NAME:
        return
    for key in override_keys:
        setting = fsdp_only_setting(key)
        if setting is not None:
            raise _fsdp_setting_error(setting)


def _leaf_keys(node: Any, prefix: str) -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix]
    return [leaf for key, value in node.items() for leaf in _leaf_keys(value, f"{prefix}.{key}")]


def _check_engine_settings(config: DictConfig) -> None:
    """The strategy and engine settings agree with the config's engine (verl's Megatron or FSDP nodes)."""
    megatron = OmegaConf.select(config, "actor_rollout_ref.actor.megatron") is not None
    for role in FSDP_ENGINE_NODES:
        strategy = _get(config, f"{role}.strategy")
        if megatron and strategy != "megatron":
            raise DistillConfigError(
                f"{role}.strategy",
                f"is {strategy!r}, and --config-name={MEGATRON_CONFIG_NAME} holds verl's Megatron engine settings",
                f"drop the override (Megatron's is {role}.strategy=megatron), "
                f"or train with FSDP: --config-name={FSDP_CONFIG_NAME}",
            )
        if not megatron and strategy == "megatron":
            raise DistillConfigError(
                f"{role}.strategy",
                f"is 'megatron', and --config-name={FSDP_CONFIG_NAME} holds verl's FSDP engine settings",
                f"train with Megatron: --config-name={MEGATRON_CONFIG_NAME}",
            )
    if not megatron:
        return
    for role in FSDP_ENGINE_NODES:
        node = OmegaConf.select(config, role)
        if node is None:
            continue
        for key in _leaf_keys(OmegaConf.to_container(node, resolve=False), role):
            setting = fsdp_only_setting(key)
            if setting is not None:  # added with +key=value, so Hydra let it through
                raise _fsdp_setting_error(setting)


def _check_teacher_slot(config: DictConfig) -> None:
    if not _get(config, TEACHER_PATH_KEY):
        raise DistillConfigError(
            TEACHER_PATH_KEY,
            "no teacher: distillation scores the student's samples with the model in the reference slot",
            f"set {TEACHER_PATH_KEY}=/path/to/teacher",
        )
    strategy = _get(config, "actor_rollout_ref.actor.strategy")
    expected_target = TEACHER_REF_TARGETS.get(strategy)
    if expected_target is None:
        raise DistillConfigError(
            "actor_rollout_ref.actor.strategy",
            f"a teacher in the reference slot is supported with {', '.join(TEACHER_REF_TARGETS)}, not {strategy!r}",
            "use --config-name=distillation_trainer (FSDP) or distillation_megatron_trainer (Megatron)",
        )
    if _get(config, "actor_rollout_ref.ref._target_") != expected_target:
        raise DistillConfigError(
            "actor_rollout_ref.ref._target_",
            f"{_get(config, 'actor_rollout_ref.ref._target_')!r} ignores actor_rollout_ref.ref.model "
            "(the reference would be a copy of the student)",
            f"use --config-name=distillation_trainer or distillation_megatron_trainer, "
            f"or set actor_rollout_ref.ref._target_={expected_target}",
        )
    unknown = unknown_teacher_model_keys(_get(config, "actor_rollout_ref.ref.model", {}))
    if unknown:
        raise DistillConfigError(
            f"actor_rollout_ref.ref.model.{unknown[0]}",
            "is not a teacher model setting",
            f"remove it; valid keys: {', '.join(sorted(TEACHER_MODEL_KEYS))}",
        )


LORA_RANK_KEY = "actor_rollout_ref.model.lora_rank"
MEGATRON_LORA_RANK_KEY = "actor_rollout_ref.model.lora.rank"
LORA_ADAPTER_PATH_KEY = "actor_rollout_ref.model.lora_adapter_path"


def _check_lora_student(config: DictConfig) -> None:
    """A LoRA student trains against a separate teacher (:mod:`verl.distill.lora_teacher`), or against
    its own base model when the teacher is the student's path (verl's adapters-off reference)."""
    from verl.distill.lora_teacher import is_students_base
    from verl.workers.roles.utils.loss_registry import needs_teacher_logits

    model = _get(config, "actor_rollout_ref.model", {})
    lora = student_lora_setting(model)
    if lora is None:
        return
    key, value = lora
    strategy = _get(config, "actor_rollout_ref.actor.strategy")
    if strategy not in ("fsdp", "fsdp2"):
        raise DistillConfigError(
            key,
            f"a LoRA student is supported with the FSDP engine, not {strategy!r}",
            f"use --config-name=distillation_trainer with {LORA_RANK_KEY}, or train the full student",
        )
    lora_rank = model.get("lora_rank") or 0
    if lora_rank <= 0 and key == MEGATRON_LORA_RANK_KEY:
        raise DistillConfigError(
            key,
            "is the Megatron engine's LoRA setting: verl's FSDP engine ignores it and would train every weight",
            f"set {LORA_RANK_KEY}={value} instead",
        )
    if lora_rank <= 0:
        raise DistillConfigError(
            LORA_ADAPTER_PATH_KEY,
            f"is set but {LORA_RANK_KEY} is 0: verl's FSDP engine loads the adapter only for a positive rank "
            "and would train every weight",
            f"set {LORA_RANK_KEY} to the adapter's rank",
        )
    teacher = _get(config, "actor_rollout_ref.ref.model", {})
    if not is_students_base(teacher.get("path"), model.get("path")):
        return
    # verl's adapters-off reference already is the student's base model: no teacher engine is built
    settings = sorted(name for name, setting in teacher.items() if name != "path" and setting is not None)
    if settings:
        raise DistillConfigError(
            f"actor_rollout_ref.ref.model.{settings[0]}",
            f"has no effect: the teacher is the LoRA student's own base model ({TEACHER_PATH_KEY} = "
            "actor_rollout_ref.model.path), which verl scores with the student's adapters switched off",
            f"remove it, or set {TEACHER_PATH_KEY} to another model",
        )
    loss_mode = _get(config, LOSS_MODE_KEY, "vanilla")
    if needs_teacher_logits(loss_mode):
        raise DistillConfigError(
            LOSS_MODE_KEY,
            f"{loss_mode} needs the teacher's logits from a reference engine, and with the LoRA student's own "
            f"base model as the teacher ({TEACHER_PATH_KEY} = actor_rollout_ref.model.path) verl builds none",
            f"set {TEACHER_PATH_KEY} to another model, or {LOSS_MODE_KEY}=distillation",
        )


def _check_loss(config: DictConfig) -> None:
    from verl.workers.roles.utils.loss_registry import is_distillation_mode, needs_teacher_logits, valid_loss_modes

    loss_mode = _get(config, LOSS_MODE_KEY, "vanilla")
    known_modes = valid_loss_modes()
    if loss_mode not in known_modes:
        raise DistillConfigError(
            LOSS_MODE_KEY, f"unknown loss mode {loss_mode!r}", f"use one of: {', '.join(known_modes)}"
        )
    distillation_loss = is_distillation_mode(loss_mode)

    use_kl_loss = bool(_get(config, "actor_rollout_ref.actor.use_kl_loss"))
    kl_in_reward = bool(_get(config, "algorithm.use_kl_in_reward"))
    if not use_kl_loss and (distillation_loss or not kl_in_reward):
        raise DistillConfigError(
            "actor_rollout_ref.actor.use_kl_loss",
            "is false: verl then builds no reference worker, so the teacher is never asked",
            "set actor_rollout_ref.actor.use_kl_loss=true",
        )

    if needs_teacher_logits(loss_mode):
        _check_teacher_topk_path(config, loss_mode)
        return  # compares whole distributions: kl_loss_type plays no part

    kl_loss_type = str(_get(config, "actor_rollout_ref.actor.kl_loss_type"))
    if distillation_loss:
        _check_distillation_estimator(kl_loss_type)
    elif kl_loss_type.removesuffix("+") not in VERL_KL_ESTIMATORS:
        raise DistillConfigError(
            KL_LOSS_TYPE_KEY,
            f"unknown KL estimator {kl_loss_type!r}",
            f"use one of: {', '.join(VERL_KL_ESTIMATORS)} (optionally with '+', e.g. k3+)",
        )


def _check_teacher_topk_path(config: DictConfig, loss_mode: str) -> None:
    """The ``*_topk`` losses pick the teacher's top-k from its logits in the FSDP reference pass and
    carry it through TransferQueue (verl/distill/teacher_topk.py): refuse what breaks that path."""
    strategy = _get(config, "actor_rollout_ref.actor.strategy")
    if strategy not in ("fsdp", "fsdp2"):
        raise DistillConfigError(
            LOSS_MODE_KEY,
            f"{loss_mode} picks the teacher's top-k in the FSDP reference pass, not available with strategy {strategy}",
            "use the FSDP trainer (distillation_trainer) or loss_mode=distillation",
        )
    if _get(config, "trainer.use_v1", True) is False:
        raise DistillConfigError(
            "trainer.use_v1",
            f"is false: {loss_mode} carries the teacher's top-k through the v1 trainer's TransferQueue",
            "drop trainer.use_v1=false, or use loss_mode=distillation",
        )
    for role in ("actor", "ref"):
        key = f"actor_rollout_ref.{role}.ulysses_sequence_parallel_size"
        if (_get(config, key, 1) or 1) > 1:
            raise DistillConfigError(
                key, f"is above 1: {loss_mode} needs each sequence's logits whole on one rank", f"set {key}=1"
            )
    if _get(config, "actor_rollout_ref.model.use_fused_kernels", False):
        raise DistillConfigError(
            "actor_rollout_ref.model.use_fused_kernels",
            f"is true: fused kernels never build the logits {loss_mode} compares",
            "set actor_rollout_ref.model.use_fused_kernels=false",
        )


def _check_distill_options(config: DictConfig) -> None:
    """The ``distill`` node builds its dataclass on the driver too: report a bad value in one line
    here rather than as Hydra's instantiation traceback from verl's own config check."""
    from verl.distill.loss_config import CONFIG_KEY, DistillLossConfig
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    node = _get(config, CONFIG_KEY)
    if node is None:
        return
    options = {key: value for key, value in node.items() if key != "_target_"}
    try:
        built = DistillLossConfig(**options)
    except TypeError as error:
        raise DistillConfigError(CONFIG_KEY, str(error), "remove the unknown key (see docs/algo/distillation.md)")
    except ValueError as error:
        key, _, problem = str(error).partition("=")
        raise DistillConfigError(key, problem, "see the option's range in docs/algo/distillation.md")
    _warn_if_validation_teacher_kl_is_not_measured(config, built.validation_teacher_kl)
    if _get(config, LOSS_MODE_KEY) == "hybrid" and built.rl_policy_loss not in POLICY_LOSS_REGISTRY:
        raise DistillConfigError(
            f"{CONFIG_KEY}.rl_policy_loss",
            f"unknown policy loss {built.rl_policy_loss!r}",
            f"use one of: {', '.join(POLICY_LOSS_REGISTRY)}",
        )


def _warn_if_validation_teacher_kl_is_not_measured(config: DictConfig, requested: bool) -> None:
    """The teacher KL at validation hooks the v1 trainer's synchronous mode only (verl/distill/validation_teacher_kl.py)."""
    from verl.distill.loss_config import CONFIG_KEY

    if not requested:
        return
    if _get(config, "trainer.use_v1", True) is False:
        unmeasured_by = "trainer.use_v1=false (the legacy trainer)"
    elif _get(config, "trainer.v1.trainer_mode", "sync") != "sync":
        unmeasured_by = f"trainer.v1.trainer_mode={_get(config, 'trainer.v1.trainer_mode')}"
    else:
        return
    logger.warning(
        "verl-distill: %s.validation_teacher_kl: not measured with %s, only in the v1 trainer's sync mode; "
        "set it to false to silence this",
        CONFIG_KEY,
        unmeasured_by,
    )


def _check_distillation_estimator(kl_loss_type: str) -> None:
    from verl.distill.divergences import sampled_kl_estimator_names

    accepted = sampled_kl_estimator_names()
    if kl_loss_type in accepted:
        return
    if f"{kl_loss_type}+" in accepted:
        raise DistillConfigError(
            KL_LOSS_TYPE_KEY,
            f"{kl_loss_type!r} (k1) as a loss has a gradient that does not depend on the teacher",
            f"use low_var_kl (k3), k3+, mse (k2) or {kl_loss_type}+ (its value with k2's gradient)",
        )
    raise DistillConfigError(
        KL_LOSS_TYPE_KEY, f"unknown KL estimator {kl_loss_type!r}", f"use one of: {', '.join(accepted)}"
    )


def _check_rewards_and_advantages(config: DictConfig) -> None:
    zero_rewards = _get(config, REWARD_MANAGER_KEY) == DISTILLATION_REWARD_MANAGER
    if zero_rewards and _get(config, "reward.reward_model.enable"):
        raise DistillConfigError(
            "reward.reward_model.enable",
            "a reward model's scores replace the distillation reward manager's zero rewards",
            "set reward.reward_model.enable=false",
        )

    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

    estimator = _get(config, "algorithm.adv_estimator")
    if estimator not in ADV_ESTIMATOR_REGISTRY:
        raise DistillConfigError(
            "algorithm.adv_estimator",
            f"unknown advantage estimator {estimator!r}",
            f"use grpo (one of: {', '.join(sorted(ADV_ESTIMATOR_REGISTRY))})",
        )
    if estimator == "gae" and zero_rewards:
        raise DistillConfigError(
            "algorithm.adv_estimator",
            "gae needs a critic, which has nothing to learn from zero rewards and makes advantages non-zero",
            "set algorithm.adv_estimator=grpo",
        )
    if estimator == "gdpo" and zero_rewards:
        raise DistillConfigError(
            "algorithm.adv_estimator",
            "gdpo needs per-component rewards (algorithm.gdpo_reward_keys); the distillation reward manager has none",
            "set algorithm.adv_estimator=grpo",
        )

    n = _get(config, "actor_rollout_ref.rollout.n")
    if not isinstance(n, int) or n < 1:
        raise DistillConfigError(
            "actor_rollout_ref.rollout.n",
            f"must be a whole number >= 1, got {n!r}",
            "set actor_rollout_ref.rollout.n=1",
        )
    if estimator == "grpo_passk" and n < 2:
        raise DistillConfigError(
            "actor_rollout_ref.rollout.n",
            f"grpo_passk compares samples of a prompt and needs at least 2, got {n}",
            "set algorithm.adv_estimator=grpo, or actor_rollout_ref.rollout.n=2 or more",
        )


# the losses that read the teacher's sampled-token log-probs, which the selective reference pass
# leaves at 0 (and weighs 0) for the responses it did not score
SELECTION_LOSS_MODES = ("distillation", "hybrid")


def _check_response_selection(config: DictConfig) -> None:
    """``distill.select_strategy`` other than ``all`` (verl/distill/selective_teacher.py)."""
    from verl.distill.loss_config import CONFIG_KEY
    from verl.distill.response_selection import REWARD_RANKED_STRATEGIES

    strategy_key, k_key = f"{CONFIG_KEY}.select_strategy", f"{CONFIG_KEY}.select_k"
    strategy = _get(config, strategy_key, "all")
    if strategy == "all":
        return
    loss_mode = _get(config, LOSS_MODE_KEY)
    if loss_mode not in SELECTION_LOSS_MODES:
        raise DistillConfigError(
            strategy_key,
            f"{strategy} leaves the teacher's log-probs of unselected responses uncomputed, which loss_mode "
            f"{loss_mode} would read (selection works with loss_mode {' or '.join(SELECTION_LOSS_MODES)})",
            f"set {strategy_key}=all, or {LOSS_MODE_KEY}=hybrid",
        )
    if _get(config, "algorithm.use_kl_in_reward"):
        raise DistillConfigError(
            strategy_key,
            f"{strategy} leaves the teacher's log-probs of unselected responses uncomputed, which the "
            "in-reward KL penalty (algorithm.use_kl_in_reward=true) reads for every response",
            f"set {strategy_key}=all, or algorithm.use_kl_in_reward=false",
        )
    if _get(config, "trainer.use_v1", True) is False:
        raise DistillConfigError(
            strategy_key,
            f"{strategy} selects responses in the v1 trainer's reference pass; trainer.use_v1=false is the legacy trainer",
            f"drop trainer.use_v1=false, or set {strategy_key}=all",
        )
    n, k = _get(config, "actor_rollout_ref.rollout.n"), _get(config, k_key, 1)
    if n == 1:
        raise DistillConfigError(
            strategy_key,
            f"{strategy} chooses among a prompt's responses, but actor_rollout_ref.rollout.n=1 gives one",
            f"set {strategy_key}=all, or actor_rollout_ref.rollout.n=2 or more",
        )
    if k >= n:
        raise DistillConfigError(
            k_key,
            f"is {k}: it selects {'all' if k == n else 'more than the'} {n} responses of each prompt "
            f"(actor_rollout_ref.rollout.n={n})",
            f"set {k_key} between 1 and {n - 1}, or {strategy_key}=all",
        )
    if strategy in REWARD_RANKED_STRATEGIES and _get(config, REWARD_MANAGER_KEY) == DISTILLATION_REWARD_MANAGER:
        raise DistillConfigError(
            strategy_key,
            f"{strategy} ranks a prompt's responses by their task reward, but the {DISTILLATION_REWARD_MANAGER} "
            "reward manager gives every response 0",
            f"set {strategy_key}=random, or use task rewards (--config-name=distillation_hybrid_trainer, "
            f"{REWARD_MANAGER_KEY}=naive)",
        )


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _check_data_files(config: DictConfig, key: str) -> None:
    files = _as_list(_get(config, key))
    if not files:
        raise DistillConfigError(key, "no data file given", f"set {key}=/path/to/file.parquet")
    if _get(config, "data.custom_cls.path"):
        return  # a custom dataset class reads its files its own way
    prompt_key = _get(config, "data.prompt_key", "prompt")
    for file in files:
        problem = _data_file_problem(str(file), prompt_key)
        if problem is not None:
            raise DistillConfigError(f"{key} ({file})", *problem)


def _data_file_problem(file: str, prompt_key: str) -> Optional[tuple[str, str]]:
    """What is wrong with a data file for verl's RL dataset, and the fix; None if nothing."""
    if "://" in file:
        logger.warning("verl-distill: data file %s is remote; it is checked when verl copies it to the workers", file)
        return None
    path = os.path.expanduser(file)
    if not os.path.exists(path):
        return "does not exist", "point the key at an existing file (a list is allowed: [a.parquet,b.parquet])"
    if not os.path.isfile(path):
        return "is not a file", "point the key at a .parquet, .json or .jsonl file, not a folder"
    if not os.access(path, os.R_OK):
        return "cannot be read", "make the file readable by this user"
    if not path.endswith(DATA_FORMATS):
        return "has an unsupported format", "convert it to .parquet, .json or .jsonl (what verl's RL dataset reads)"
    try:
        num_rows, columns = _parquet_shape(path) if path.endswith(".parquet") else _json_shape(path)
    except Exception as error:  # any reader failure means verl's loader would fail too
        return f"is unreadable ({type(error).__name__}: {error})", "rewrite the file; verl's RL dataset cannot read it"
    if num_rows == 0:
        return "is empty", "give a file with at least one row"
    if prompt_key not in columns:
        return (
            f"has no {prompt_key!r} column (columns: {', '.join(sorted(columns))})",
            "add the prompt column (chat messages) or set data.prompt_key to the column that holds the prompt",
        )
    return None


def _parquet_shape(path: str) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    return parquet_file.metadata.num_rows, parquet_file.schema_arrow.names


def _json_shape(path: str) -> tuple[int, list[str]]:
    """Rows (0 or 1: only the first record is read) and columns of a JSON-lines or JSON-array file."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            if line.lstrip().startswith("["):
                handle.seek(0)
                records = json.load(handle)
                return len(records), list(records[0]) if records else []
            return 1, list(json.loads(line))
    return 0, []


# --- on/off-policy mixing (verl.distill.policy_mixing) ---------------------------------------------


def _check_policy_mixing(config: DictConfig) -> None:
    on_policy_lambda = _get(config, policy_mixing.LAMBDA_KEY, 1.0)
    if (
        isinstance(on_policy_lambda, bool)
        or not isinstance(on_policy_lambda, int | float)
        or not 0.0 <= on_policy_lambda <= 1.0  # also refuses NaN
    ):
        raise DistillConfigError(
            policy_mixing.LAMBDA_KEY,
            f"is {on_policy_lambda!r}, not a number in [0, 1]",
            "set the fraction of steps on which the student generates: 1.0 (every step, the default) down to "
            f"0.0 (every step trains on {policy_mixing.FILES_KEY})",
        )
    if not policy_mixing.mixes_policies(config):
        return
    off_policy_share = (
        f"{policy_mixing.LAMBDA_KEY}={on_policy_lambda} makes about {1 - on_policy_lambda:.0%} of the steps off-policy"
    )
    files = policy_mixing.off_policy_files(config)
    if not files:
        raise DistillConfigError(
            policy_mixing.FILES_KEY,
            f"no file given, but {off_policy_share}",
            f"set {policy_mixing.FILES_KEY}=/path/to/responses.parquet (a prompt and a response column), "
            f"or {policy_mixing.LAMBDA_KEY}=1.0",
        )
    response_key = _get(config, policy_mixing.RESPONSE_KEY_KEY)
    if not isinstance(response_key, str) or not response_key:
        raise DistillConfigError(
            policy_mixing.RESPONSE_KEY_KEY,
            f"is {response_key!r}, not a column name",
            f"set {policy_mixing.RESPONSE_KEY_KEY} to the column of {policy_mixing.FILES_KEY} that holds the responses",
        )
    _check_mixing_pipeline(config, off_policy_share)
    prompt_key = _get(config, "data.prompt_key", "prompt")
    for file in files:
        problem = _data_file_problem(file, prompt_key) or _response_column_problem(file, response_key)
        if problem is not None:
            raise DistillConfigError(f"{policy_mixing.FILES_KEY} ({file})", *problem)


def _check_mixing_pipeline(config: DictConfig, off_policy_share: str) -> None:
    """The mixing plugs into verl's v1 synchronous trainer, its agent-loop manager and its replay buffer."""
    unmixable = [
        ("trainer.use_v1", _get(config, "trainer.use_v1") is not True, "true", "the legacy trainer is not supported"),
        (
            "trainer.v1.trainer_mode",
            _get(config, "trainer.v1.trainer_mode") != "sync",
            "sync",
            "an asynchronous trainer mixes prompts of several steps in one batch",
        ),
        (
            "actor_rollout_ref.rollout.n",
            int(_get(config, "actor_rollout_ref.rollout.n", 1)) != 1,
            "1",
            "an off-policy step would train on n copies of each dataset response",
        ),
        (
            policy_mixing.MANAGER_KEY,
            _get(config, policy_mixing.MANAGER_KEY) not in policy_mixing.MIXED_POLICY_MANAGERS,
            "null",
            "off-policy steps need verl-distill's extension of verl's agent-loop manager, not another one",
        ),
        (
            policy_mixing.SAMPLER_PATH_KEY,
            bool(_get(config, policy_mixing.SAMPLER_PATH_KEY)),
            "null",
            "off-policy steps need verl-distill's replay buffer, not another one",
        ),
        (
            "algorithm.filter_groups.enable",
            bool(_get(config, "algorithm.filter_groups.enable")),
            "false",
            "group filtering refills a step with prompts one at a time",
        ),
        (
            "trainer.v1.sampler.sync_refill_failed_groups",
            bool(_get(config, "trainer.v1.sampler.sync_refill_failed_groups")),
            "false",
            "refilling failed groups submits prompts one at a time",
        ),
    ]
    for key, refused, supported, why in unmixable:
        if refused:
            raise DistillConfigError(
                key,
                f"is {_get(config, key)!r}, which {off_policy_share} cannot use: {why}",
                f"set {key}={supported}, or {policy_mixing.LAMBDA_KEY}=1.0",
            )


def _response_column_problem(file: str, response_key: str) -> Optional[tuple[str, str]]:
    """What is wrong with the response column of an off-policy data file (readable, with prompts)."""
    if "://" in file:
        return None
    path = os.path.expanduser(file)
    columns = (_parquet_shape(path) if path.endswith(".parquet") else _json_shape(path))[1]
    if response_key not in columns:
        return (
            f"has no {response_key!r} column (columns: {', '.join(sorted(columns))})",
            f"add the responses as a text column named {response_key!r}, or set "
            f"{policy_mixing.RESPONSE_KEY_KEY} to the column that holds them",
        )
    responses = _first_column_values(path, response_key, PROMPT_CHECK_ROWS)
    for row, response in enumerate(responses):
        if not isinstance(response, str):
            return (
                f"row {row} of column {response_key!r} is {type(response).__name__}, not text",
                f"give every row its response as a string in {response_key!r}",
            )
    return None


def _warn_of_cut_off_policy_responses(config: DictConfig, tokenizer) -> None:
    """Responses longer than ``data.max_response_length`` are cut like a rollout at the limit: say how
    many, since verl's ``response_length/clip_ratio`` counts responses as long as the batch's longest."""
    if not policy_mixing.mixes_policies(config):
        return
    max_length = int(_get(config, "data.max_response_length"))
    response_key = _get(config, policy_mixing.RESPONSE_KEY_KEY)
    for file in policy_mixing.off_policy_files(config):
        if "://" in file:
            continue
        responses = _first_column_values(os.path.expanduser(file), response_key, PROMPT_CHECK_ROWS)
        # + 1: the end-of-sequence token a response is ended with
        lengths = [len(ids) + 1 for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
        cut = sum(length > max_length for length in lengths)
        if cut:
            logger.warning(
                "verl-distill: %s: %d of the %d responses checked are longer than data.max_response_length=%d "
                "tokens (with the end-of-sequence token, longest %d); they are cut there, as a rollout that hits "
                "the limit is",
                file,
                cut,
                len(lengths),
                max_length,
                max(lengths),
            )


def _first_column_values(path: str, column: str, max_rows: int) -> list:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        values = []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(max_rows, PROMPT_BATCH_ROWS), columns=[column]):
            values.extend(batch.column(column).to_pylist()[: max_rows - len(values)])
            if len(values) >= max_rows:
                break
        return values
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [record.get(column) for record in records[:max_rows]]


def _model_folder_problem(path: str) -> Optional[str]:
    if "://" in path:
        return None  # remote: verl copies it to local disk itself
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        if _HUB_REPO_ID.match(path):
            return None  # a hub repository id, resolved by transformers
        return "does not exist"
    if not os.path.isdir(local):
        return "is a file, not a model folder"
    if not os.path.isfile(os.path.join(local, "config.json")):
        return "is not a model folder (no config.json)"
    return None


def _check_model_folders(config: DictConfig) -> None:
    for key in ("actor_rollout_ref.model.path", TEACHER_PATH_KEY):
        path = str(_get(config, key))
        problem = _model_folder_problem(path)
        if problem is not None:
            raise DistillConfigError(
                f"{key} ({path})", problem, "point it at a Hugging Face model folder (config.json, weights, tokenizer)"
            )


def _tokenizer_location(config: DictConfig, model_key: str) -> str:
    return os.path.expanduser(str(_get(config, f"{model_key}.tokenizer_path") or _get(config, f"{model_key}.path")))


def _only_workers_see(location: str) -> bool:
    """A model location the driver cannot open: a remote URL (hdfs://, s3://, ...) or a hub id that
    is not a local folder (the driver may have no hub access; workers download or copy it)."""
    return "://" in location or (not os.path.exists(location) and bool(_HUB_REPO_ID.match(location)))


def _warn_unchecked(key: str, location: str, checks: str) -> None:
    logger.warning(
        "verl-distill: %s=%s is not a local path on the driver; %s skipped (the workers load it)", key, location, checks
    )


def _check_tokenizers(config: DictConfig) -> None:
    student = _tokenizer_location(config, "actor_rollout_ref.model")
    teacher = _tokenizer_location(config, "actor_rollout_ref.ref.model")
    for key, location in (("actor_rollout_ref.model.path", student), (TEACHER_PATH_KEY, teacher)):
        if _only_workers_see(location):
            _warn_unchecked(key, location, "the comparison of the teacher's and the student's tokenizers is")
            return
    student_trust = bool(_get(config, "actor_rollout_ref.model.trust_remote_code"))
    teacher_trust = _get(config, "actor_rollout_ref.ref.model.trust_remote_code")
    try:
        check_tokenizers_match(
            student,
            teacher,
            student_trust_remote_code=student_trust,
            teacher_trust_remote_code=student_trust if teacher_trust is None else bool(teacher_trust),
        )
    except TokenizerMismatchError as mismatch:
        raise DistillConfigError(
            TEACHER_PATH_KEY,
            f"the teacher's tokenizer differs from the student's: {mismatch}",
            "use a teacher with the student's tokenizer (e.g. the same model family); "
            "an embedding matrix of another size is fine",
        ) from None
    except (OSError, ValueError) as error:
        raise DistillConfigError(
            f"{TEACHER_PATH_KEY} / actor_rollout_ref.model.path",
            f"cannot load the tokenizers to compare them: {type(error).__name__}: {error}",
            "point both at model folders with a tokenizer (or set their tokenizer_path)",
        ) from None


def _student_tokenizer(config: DictConfig):
    """The student's tokenizer as verl's trainer loads it for the dataset and the rollout; None if remote."""
    location = _tokenizer_location(config, "actor_rollout_ref.model")
    if _only_workers_see(location):
        _warn_unchecked("actor_rollout_ref.model.path", location, "the top-k and prompt-length checks are")
        return None
    from transformers import AutoTokenizer

    trust_remote_code = bool(_get(config, "actor_rollout_ref.model.trust_remote_code"))
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    custom_chat_template = _get(config, "actor_rollout_ref.model.custom_chat_template")
    if custom_chat_template is not None:
        tokenizer.chat_template = custom_chat_template
    return tokenizer


def _check_topk(config: DictConfig, tokenizer) -> None:
    from verl.distill.loss_config import CONFIG_KEY, DistillLossConfig
    from verl.workers.roles.utils.loss_registry import needs_teacher_logits

    if not needs_teacher_logits(str(_get(config, LOSS_MODE_KEY))):
        return  # the sampled-token losses keep no top-k
    topk = _get(config, f"{CONFIG_KEY}.topk", DistillLossConfig.topk)
    vocabulary = len(tokenizer)
    if topk > vocabulary:
        raise DistillConfigError(
            f"{CONFIG_KEY}.topk",
            f"is {topk}, more than the {vocabulary} tokens of the student's tokenizer",
            f"set it to at most {vocabulary}; "
            f"{CONFIG_KEY}.topk={vocabulary} gives the exact full-vocabulary divergence",
        )


def _check_prompt_lengths(config: DictConfig, tokenizer) -> None:
    """With ``data.truncation=error``, no prompt may be longer than ``data.max_prompt_length``.

    verl 0.9.1 documents ``truncation=error`` as an error for such a prompt, but its agent loop
    left-truncates a text prompt (the question's beginning is lost) with only a warning in a worker's
    log. ``data.filter_overlong_prompts=true`` makes verl's dataset drop such rows instead; any other
    ``truncation`` asks for a cut. Lengths are measured as the dataset's filter does.
    """
    if _get(config, "data.truncation") != "error" or _get(config, "data.filter_overlong_prompts"):
        return
    if any(_get(config, key) for key in ("data.custom_cls.path", "data.tool_config_path", "data.function_tool_path")):
        return  # a dataset class of its own, or tool schemas rendered into every prompt: left to verl
    if not tokenizer.chat_template:
        raise DistillConfigError(
            "actor_rollout_ref.model.path",
            "the student's tokenizer has no chat template, and verl renders every prompt with it",
            "use a model whose tokenizer has a chat template, or set actor_rollout_ref.model.custom_chat_template",
        )
    options = {
        key: value
        for key, value in (_get(config, "data.apply_chat_template_kwargs") or {}).items()
        if key not in ("tokenize", "return_dict", "return_tensors")  # verl's dataset drops them too
    }
    max_length = int(_get(config, "data.max_prompt_length"))
    prompt_key = _get(config, "data.prompt_key", "prompt")
    media_keys = [_get(config, f"data.{kind}_key", f"{kind}s") for kind in ("image", "video", "audio")]
    splits = DATA_SPLITS + (((policy_mixing.FILES_KEY, None),) if policy_mixing.mixes_policies(config) else ())
    for files_key, max_samples_key in splits:
        max_samples = int((max_samples_key and _get(config, max_samples_key)) or -1)
        # verl keeps the first max_samples rows of the split, or a random choice of them when shuffling
        rows_left = max_samples if max_samples > 0 and not _get(config, "data.shuffle") else None
        rows_left = PROMPT_CHECK_ROWS if rows_left is None else min(rows_left, PROMPT_CHECK_ROWS)
        for file in _as_list(_get(config, files_key)):
            if "://" in str(file):
                continue
            if rows_left == 0:
                logger.warning(
                    "verl-distill: %s: prompt lengths checked on the first %d rows only; %s is not checked",
                    files_key,
                    PROMPT_CHECK_ROWS,
                    file,
                )
                continue
            try:
                prompts = _text_prompts(os.path.expanduser(str(file)), prompt_key, media_keys, rows_left)
            except Exception as error:  # a row past the first that verl's loader could not read either
                raise DistillConfigError(
                    f"{files_key} ({file})",
                    f"is unreadable ({type(error).__name__}: {error})",
                    "rewrite the file; verl's RL dataset cannot read it",
                ) from None
            if prompts is None:
                continue  # images, videos or audio: verl measures them with the processor, and fails itself
            rows_left -= len(prompts)
            problem = _overlong_prompt_problem(tokenizer, prompts, max_length, options)
            if problem is not None:
                raise DistillConfigError(f"{files_key} ({file})", *problem)


def _text_prompts(path: str, prompt_key: str, media_keys: list[str], max_rows: int) -> Optional[list]:
    """The prompts of the first ``max_rows`` rows of a data file; None if its rows carry images,
    videos or audio. Reads no further than those rows (a JSON array is parsed whole)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet_file = pq.ParquetFile(path)
        if set(media_keys) & set(parquet_file.schema_arrow.names):
            return None
        prompts = []
        for batch in parquet_file.iter_batches(batch_size=min(max_rows, PROMPT_BATCH_ROWS), columns=[prompt_key]):
            prompts.extend(batch.column(prompt_key).to_pylist()[: max_rows - len(prompts)])
            if len(prompts) >= max_rows:
                break
        _warn_if_sampled(path, len(prompts), parquet_file.metadata.num_rows > len(prompts))
        return prompts
    with open(path, encoding="utf-8") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[":
            records = json.load(handle)
            more_rows = len(records) > max_rows
            records = records[:max_rows]
        else:
            records, more_rows = [], False
            for line in handle:
                if not line.strip():
                    continue
                if len(records) == max_rows:
                    more_rows = True
                    break
                records.append(json.loads(line))
    if any(key in record for record in records for key in media_keys):
        return None
    _warn_if_sampled(path, len(records), more_rows)
    return [record.get(prompt_key) for record in records]


def _warn_if_sampled(path: str, checked: int, more_rows: bool) -> None:
    if more_rows:
        logger.warning(
            "verl-distill: data.truncation=error: prompt lengths of %s checked on its first %d rows only", path, checked
        )


def _overlong_prompt_problem(tokenizer, prompts: list, max_length: int, options: dict) -> Optional[tuple[str, str]]:
    """The first prompt longer than ``max_length`` tokens (or that cannot be rendered), and the fix."""
    for start in range(0, len(prompts), PROMPT_BATCH_ROWS):
        batch = prompts[start : start + PROMPT_BATCH_ROWS]
        try:
            lengths = _prompt_lengths(tokenizer, batch, options)
        except _PromptError as error:
            return (
                f"row {start + error.offset} has a prompt the chat template cannot render ({error.reason})",
                "give every row a list of chat messages ({'role': ..., 'content': ...}) in the prompt column",
            )
        for offset, length in enumerate(lengths):
            if length > max_length:
                return (
                    f"row {start + offset} has a prompt of {length} tokens (chat template applied), more than "
                    f"data.max_prompt_length={max_length}, and data.truncation=error",
                    f"raise data.max_prompt_length (this prompt needs {length}), or set data.truncation=left "
                    "(keep each prompt's end) or data.filter_overlong_prompts=true (drop such rows)",
                )
    return None


class _PromptError(ValueError):
    """A prompt of a batch that cannot be rendered: its position in the batch, and why."""

    def __init__(self, offset: int, reason: str):
        super().__init__(offset, reason)
        self.offset, self.reason = offset, reason


def _prompt_lengths(tokenizer, prompts: list, options: dict) -> list[int]:
    """Token counts as verl's RL dataset measures a prompt (chat template with the generation prompt,
    no special tokens added), rendered and tokenized as one batch."""
    for offset, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not all(isinstance(message, dict) for message in prompt):
            raise _PromptError(offset, f"not a list of chat messages but {type(prompt).__name__}")
    try:
        texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False, **options)
    except Exception:  # find the prompt the chat template fails on
        for offset, prompt in enumerate(prompts):
            try:
                tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **options)
            except Exception as error:
                raise _PromptError(offset, f"{type(error).__name__}: {error}") from None
        raise
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    # the Rust tokenizer's encodings, counted without building a Python list of ids per prompt
    return [len(encoding) for encoding in backend.encode_batch(texts, add_special_tokens=False)]
