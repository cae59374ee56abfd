"""The teacher in verl's reference slot.

verl 0.9.1 has no key for a reference model of its own. ``ActorRolloutRefWorker.init_model`` builds
the ref config from ``actor_rollout_ref.ref`` (Hydra ``_target_``) and then makes exactly one
assignment, ``ref_config.model_config = deepcopy(model_config)``: the student's model config.
Everything the ref engine loads comes from that ``model_config``.

The ref config classes below (``actor_rollout_ref.ref._target_`` in the distillation trainer
configs) accept a ``model`` node, ``actor_rollout_ref.ref.model``, and turn that one assignment into
the teacher's :class:`HFModelConfig`. The teacher keeps the student's loading settings
(``trust_remote_code``, ``override_config`` such as the attention implementation,
``use_remove_padding``, ...), drops what describes the student's own weights (everything derived
from its path, LoRA, MTP) and then applies the ``ref.model`` keys; dict-valued keys such as
``override_config`` are merged key by key into the student's. Without ``ref.model.path`` the ref is
the student, as in stock verl.

This hangs on one line of verl: :func:`verify_init_model_routes_ref_model_config` checks verl's
source for it and :func:`check_ref_holds_teacher` checks what the built ref engine holds.
"""

import inspect
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from verl.workers.config import FSDPActorConfig, HFModelConfig, McoreActorConfig

TEACHER_PATH_KEY = "actor_rollout_ref.ref.model.path"

# Filled in by HFModelConfig.__post_init__ from the model's path: the teacher's come from its own path.
_DERIVED_FROM_PATH = frozenset(
    {
        "local_path",
        "hf_config_path",
        "local_hf_config_path",
        "tokenizer_path",
        "local_tokenizer_path",
        "hf_config",
        "generation_config",
        "tokenizer",
        "processor",
        "architectures",
    }
)

# Adapters and multi-token prediction belong to the student being trained; the teacher is plain.
_STUDENT_ONLY = frozenset(
    {
        "lora_rank",
        "lora_alpha",
        "target_modules",
        "target_parameters",
        "exclude_modules",
        "lora",
        "lora_adapter_path",
        "mtp",
    }
)

_INHERITED_FROM_STUDENT = frozenset(
    f.name for f in fields(HFModelConfig) if f.init and f.name not in _DERIVED_FROM_PATH | _STUDENT_ONLY | {"path"}
)

TEACHER_MODEL_KEYS = frozenset({"path", "hf_config_path", "tokenizer_path"} | (_INHERITED_FROM_STUDENT - {"_target_"}))
"""Keys accepted under ``actor_rollout_ref.ref.model``."""

# The step of verl's init_model this module depends on, and where its result goes.
REF_MODEL_CONFIG_ASSIGNMENT = "ref_config.model_config = deepcopy(model_config)"
REF_ENGINE_BUILT_FROM = "model_config=ref_config.model_config"


class TeacherSlotError(RuntimeError):
    """The teacher did not, or would not, reach verl's reference engine."""


class TokenizerMismatchError(ValueError):
    """Student and teacher map tokens to ids differently, so teacher log-probs would be meaningless."""


def unknown_teacher_model_keys(teacher: Mapping[str, Any]) -> list[str]:
    return sorted(set(teacher) - TEACHER_MODEL_KEYS)


def _refuse_unknown_teacher_keys(teacher: Mapping[str, Any]) -> None:
    unknown = unknown_teacher_model_keys(teacher)
    if unknown:
        raise ValueError(
            f"actor_rollout_ref.ref.model.{unknown[0]} is not a teacher model setting; "
            f"valid keys: {', '.join(sorted(TEACHER_MODEL_KEYS))}"
        )


def build_teacher_model_config(student: HFModelConfig, teacher: Mapping[str, Any]) -> HFModelConfig:
    """The teacher's model config: the student's loading settings, then the ``ref.model`` keys that are set."""
    _refuse_unknown_teacher_keys(teacher)
    settings = {name: deepcopy(getattr(student, name)) for name in _INHERITED_FROM_STUDENT}
    for key, value in teacher.items():
        if value is None:
            continue  # unset in the yaml: the student's setting (or, for path-derived keys, the teacher's path)
        inherited = settings.get(key)
        if isinstance(value, Mapping) and isinstance(inherited, Mapping):
            settings[key] = {**inherited, **value}
        else:
            settings[key] = deepcopy(value)
    return HFModelConfig(**settings)


class _TeacherInRefSlot:
    """Turns verl's ``ref_config.model_config = <student>`` into the teacher's model config.

    verl's configs are frozen after construction except their ``_mutable_fields``; ``model_config``
    is one of ActorConfig's (verl assigns it after building the config), ``model`` is not.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        teacher = self.__dict__.get("model") or {}
        if name == "model_config" and isinstance(value, HFModelConfig) and teacher.get("path"):
            value = build_teacher_model_config(value, teacher)
        super().__setattr__(name, value)


@dataclass
class FSDPTeacherRefConfig(_TeacherInRefSlot, FSDPActorConfig):
    """verl's FSDP ref config plus ``model``: the teacher (``path`` and :data:`TEACHER_MODEL_KEYS`)."""

    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        _refuse_unknown_teacher_keys(self.model)


@dataclass
class McoreTeacherRefConfig(_TeacherInRefSlot, McoreActorConfig):
    """verl's Megatron ref config plus ``model``: the teacher (``path`` and :data:`TEACHER_MODEL_KEYS`).

    Megatron's model-parallel state is process-global and the ref is built first, so the teacher runs
    with the actor's TP/PP/CP/EP layout (verl's Megatron ref yaml already follows the actor's).
    """

    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        _refuse_unknown_teacher_keys(self.model)


TEACHER_REF_TARGETS = {
    "megatron": f"{McoreTeacherRefConfig.__module__}.{McoreTeacherRefConfig.__qualname__}",
    "fsdp": f"{FSDPTeacherRefConfig.__module__}.{FSDPTeacherRefConfig.__qualname__}",
    "fsdp2": f"{FSDPTeacherRefConfig.__module__}.{FSDPTeacherRefConfig.__qualname__}",
}
"""The ref ``_target_`` that carries a teacher, by ``actor_rollout_ref.actor.strategy``."""


def verify_init_model_routes_ref_model_config(init_model_source: Optional[str] = None) -> None:
    """Fail loudly unless verl's ``init_model`` still builds the ref engine from the assigned model config."""
    if init_model_source is None:
        from verl.workers.engine_workers import ActorRolloutRefWorker

        init_model_source = inspect.getsource(ActorRolloutRefWorker.init_model)
    for step in (REF_MODEL_CONFIG_ASSIGNMENT, REF_ENGINE_BUILT_FROM):
        if step not in init_model_source:
            raise TeacherSlotError(
                f"verl's ActorRolloutRefWorker.init_model no longer contains `{step}`: the teacher "
                f"({TEACHER_PATH_KEY}) would not reach the reference engine; use the verl version "
                "verl-distill was written for"
            )


def check_ref_holds_teacher(worker) -> None:
    """After ``ActorRolloutRefWorker.init_model``: the ref engine must hold the requested teacher."""
    teacher_path = (worker.config.ref.get("model") or {}).get("path")
    if not teacher_path or getattr(worker, "ref", None) is None:
        return
    loaded_path = worker.ref.engine.model_config.path
    if loaded_path != teacher_path:
        raise TeacherSlotError(
            f"the reference engine loaded {loaded_path!r} instead of the teacher {teacher_path!r} "
            f"({TEACHER_PATH_KEY}): verl's ref construction changed; "
            "use the verl version verl-distill was written for"
        )


def student_lora_setting(model: Mapping[str, Any]) -> Optional[tuple[str, Any]]:
    """The ``actor_rollout_ref.model`` key that makes the student a LoRA model in verl's eyes, if any.

    These are the keys verl's trainer reads to make the actor its own reference (adapters off, no
    reference model): :mod:`verl.distill.lora_teacher` loads a separate teacher for such a student.
    """
    lora = model.get("lora") or {}
    if (lora.get("rank") or 0) > 0:
        return "actor_rollout_ref.model.lora.rank", lora.get("rank")
    if (model.get("lora_rank") or 0) > 0:
        return "actor_rollout_ref.model.lora_rank", model.get("lora_rank")
    if model.get("lora_adapter_path") is not None:
        return "actor_rollout_ref.model.lora_adapter_path", model.get("lora_adapter_path")
    return None


def check_tokenizers_match(
    student_path: str,
    teacher_path: str,
    student_trust_remote_code: bool = False,
    teacher_trust_remote_code: bool = False,
) -> None:
    """Refuse a teacher whose token -> id map differs from the student's.

    The teacher scores the student's token ids, so the two must agree on what each id means. The
    embedding size (config ``vocab_size``) may differ: checkpoints pad it differently, e.g.
    Qwen2.5-0.5B has 151936 rows and Qwen2.5-7B 152064 with the same tokenizer.
    """
    from transformers import AutoTokenizer

    student_tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=student_trust_remote_code)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=teacher_trust_remote_code)
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    differing = sorted(
        token
        for token in student_vocab.keys() | teacher_vocab.keys()
        if student_vocab.get(token) != teacher_vocab.get(token)
    )
    example = differing[0]
    raise TokenizerMismatchError(
        f"{len(differing)} tokens map to different ids (e.g. {example!r}: student {student_vocab.get(example)}, "
        f"teacher {teacher_vocab.get(example)}; vocabularies of {len(student_vocab)} and "
        f"{len(teacher_vocab)} tokens)"
    )
