"""Checks of a distillation config on the driver, before Ray starts.

A distillation mistake otherwise shows up minutes later inside a Ray worker, or never: a LoRA
student or a teacher with another tokenizer trains without an error against a meaningless target.
:func:`validate_distillation_config` raises :class:`DistillConfigError`, one line naming the key (or
file) and the fix. It checks only configs that select distillation (a distillation loss mode, the
``distillation`` reward manager, or a teacher in ``actor_rollout_ref.ref.model.path``); the rest is left to
verl. Cheap checks run first, the tokenizer comparison (which loads both tokenizers) last.
"""

import json
import os
import re
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from verl.distill.teacher import (
    TEACHER_MODEL_KEYS,
    TEACHER_PATH_KEY,
    TEACHER_REF_TARGETS,
    TokenizerMismatchError,
    check_tokenizers_match,
    student_lora_setting,
    unknown_teacher_model_keys,
)

DISTILLATION_REWARD_MANAGER = "distillation"

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
REWARD_MANAGER_KEY = "reward.reward_manager.name"

KL_LOSS_TYPE_KEY = "actor_rollout_ref.actor.kl_loss_type"
# verl's kl_penalty estimators (a trailing "+" keeps the value and takes k2's gradient), for a
# policy loss of verl's next to the zero rewards; the distillation losses accept their own subset.
VERL_KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

DATA_FILE_KEYS = ("data.train_files", "data.val_files")
DATA_FORMATS = (".parquet", ".json", ".jsonl")

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
    _check_student(config)
    _check_teacher_slot(config)
    _check_loss(config)
    _check_distill_options(config)
    _check_rewards_and_advantages(config)
    for key in DATA_FILE_KEYS:
        _check_data_files(config, key)
    _check_model_folders(config)
    _check_tokenizers(config)


def _check_student(config: DictConfig) -> None:
    lora = student_lora_setting(_get(config, "actor_rollout_ref.model", {}))
    if lora is not None:
        key, value = lora
        raise DistillConfigError(
            key,
            f"a LoRA student ({value}) makes verl use the student without adapters as the reference, "
            "so the teacher is never loaded",
            f"train the full student: remove {key} (distillation with LoRA is not supported)",
        )


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
        strategy = _get(config, "actor_rollout_ref.actor.strategy")
        if strategy not in ("fsdp", "fsdp2"):
            raise DistillConfigError(
                LOSS_MODE_KEY,
                f"{loss_mode} reads the teacher's logits inside the FSDP actor update, not available with strategy {strategy}",
                "use the FSDP trainer (distillation_trainer) or loss_mode=distillation",
            )
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
    if _get(config, LOSS_MODE_KEY) == "hybrid" and built.rl_policy_loss not in POLICY_LOSS_REGISTRY:
        raise DistillConfigError(
            f"{CONFIG_KEY}.rl_policy_loss",
            f"unknown policy loss {built.rl_policy_loss!r}",
            f"use one of: {', '.join(POLICY_LOSS_REGISTRY)}",
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
        return None  # remote (hdfs, s3, ...): verl copies it to local disk itself
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


def _check_tokenizers(config: DictConfig) -> None:
    student = _tokenizer_location(config, "actor_rollout_ref.model")
    teacher = _tokenizer_location(config, "actor_rollout_ref.ref.model")
    if "://" in student or "://" in teacher:
        return  # remote: compared only after verl copies it, in the workers
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
