"""A LoRA student with a teacher: the teacher is loaded as a separate reference model.

verl 0.9.1 treats a LoRA actor (``actor_rollout_ref.model.lora_rank > 0`` or ``lora_adapter_path``)
as its own reference: its trainer sets ``ref_in_actor``, builds no reference model and asks the
actor for the reference log-probs with the adapters switched off (``compute_log_prob`` with
``no_lora_adapter=True``). That reference is the student's base model, so a teacher in
``actor_rollout_ref.ref.model.path`` would never be loaded.

When the teacher is another model than the student, the actor's worker builds verl's reference
model next to the actor (the same code path as for a full-weight student, so the teacher loads
through :mod:`verl.distill.teacher`), and the adapters-off request is answered by that teacher. The
trainer is untouched: it still takes the actor's ``no_lora_adapter`` route, whose answer is now the
teacher's log-probs. When the teacher is the student's own path, verl's adapters-off reference
already is that model, at no extra memory, and verl's behaviour is kept.
"""

import functools
import os
from collections.abc import Mapping
from typing import Any, Optional

from verl.distill.teacher import student_lora_setting

LORA_TEACHER_RUN_ENV = "VERL_DISTILL_LORA_TEACHER"

# The request verl's trainer sends the actor for reference log-probs when the actor is a LoRA model.
ADAPTERS_OFF_KEY = "no_lora_adapter"
ROUTING_REPLAY_KEY = "enable_routing_replay"


def _model_location(path: str) -> str:
    expanded = os.path.expanduser(path)
    return os.path.realpath(expanded) if os.path.exists(expanded) else path.rstrip("/")


def is_students_base(teacher_path: Optional[str], student_path: Optional[str]) -> bool:
    """Whether the teacher names the student's own model (the base a LoRA student's adapters sit on)."""
    return bool(teacher_path) and bool(student_path) and _model_location(teacher_path) == _model_location(student_path)


def separate_teacher_for_lora_student(model: Mapping[str, Any], ref_model: Optional[Mapping[str, Any]]) -> bool:
    """True when the student trains LoRA adapters and ``ref.model.path`` names another model."""
    teacher_path = (ref_model or {}).get("path")
    return (
        student_lora_setting(model) is not None
        and bool(teacher_path)
        and not is_students_base(teacher_path, model.get("path"))
    )


def lora_teacher_run() -> bool:
    """True in every process of a run whose driver found a LoRA student with a separate teacher."""
    return os.environ.get(LORA_TEACHER_RUN_ENV) == "1"


class LoRATeacherError(RuntimeError):
    """The teacher of a LoRA student could not take the place of verl's adapters-off reference."""


def _answer_adapters_off_requests_with_the_teacher(worker) -> None:
    """Route the actor's adapters-off log-prob requests (verl's reference pass for a LoRA actor) to the teacher."""
    from verl.utils import tensordict_utils as tu

    actor, teacher = worker.actor, worker.ref
    if actor.get_dispatch_collect() != teacher.get_dispatch_collect():
        raise LoRATeacherError(
            "the teacher and the LoRA student are split across ranks differently "
            f"({teacher.get_dispatch_collect()} vs {actor.get_dispatch_collect()}): the actor's reference requests "
            "cannot be answered by the teacher; give actor_rollout_ref.ref and actor_rollout_ref.actor the same "
            "ulysses_sequence_parallel_size"
        )
    actor_infer_batch = actor.infer_batch

    @functools.wraps(actor_infer_batch)
    def infer_batch(data):
        if not tu.get(data, ADAPTERS_OFF_KEY, default=False):
            return actor_infer_batch(data)
        tu.pop(data, ADAPTERS_OFF_KEY)
        if tu.get(data, ROUTING_REPLAY_KEY, default=None) is not None:
            # the teacher's own experts, as in verl's reference pass (compute_ref_log_prob)
            tu.assign_non_tensor_data(data, ROUTING_REPLAY_KEY, False)
        return teacher.infer_batch(data)

    actor.infer_batch = infer_batch


def with_teacher_beside_lora_actor(init_model):
    """``ActorRolloutRefWorker.init_model`` that also builds the reference model (the teacher) in a
    LoRA student's actor worker, and has it answer the actor's adapters-off requests."""

    @functools.wraps(init_model)
    def wrapped(self):
        if "actor" not in self.role or not separate_teacher_for_lora_student(self.config.model, self.config.ref.get("model")):
            return init_model(self)
        role = self.role
        # verl builds the reference model where the role names it; its trainer gave a LoRA actor none
        self.role = role if "ref" in role else f"{role}_ref"
        try:
            init_model(self)
        finally:
            self.role = role
        _answer_adapters_off_requests_with_the_teacher(self)

    return wrapped


def check_lora_student_has_its_teacher(worker) -> None:
    """After ``init_model`` in a distillation run: a LoRA actor whose config names a separate teacher
    must hold it, else verl would use the student's base model as the reference without a word."""
    if getattr(worker, "actor", None) is None or getattr(worker, "ref", None) is not None:
        return
    if separate_teacher_for_lora_student(worker.config.model, worker.config.ref.get("model")):
        raise LoRATeacherError(
            f"the LoRA student's teacher ({worker.config.ref.model.path}) was not loaded: this run is not marked "
            f"{LORA_TEACHER_RUN_ENV}=1, so verl would use the student without adapters as the reference; start "
            f"the run with python -m verl.trainer.main_ppo (its driver marks it), or set "
            f"ray_kwargs.ray_init.runtime_env.env_vars.{LORA_TEACHER_RUN_ENV}=1"
        )
