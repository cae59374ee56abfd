"""A LoRA student's teacher takes the place of verl's adapters-off reference (verl.distill.lora_teacher)."""

import os
import types

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from verl.distill import compat
from verl.distill.lora_teacher import (
    ADAPTERS_OFF_KEY,
    LoRATeacherError,
    check_lora_student_has_its_teacher,
    is_students_base,
    separate_teacher_for_lora_student,
    with_teacher_beside_lora_actor,
)
from verl.utils import tensordict_utils as tu


@pytest.mark.parametrize(
    ("model", "teacher", "separate"),
    [
        ({"path": "/m/student", "lora_rank": 8}, {"path": "/m/teacher"}, True),
        ({"path": "/m/student", "lora_rank": 8, "lora_adapter_path": "/a"}, {"path": "/m/teacher"}, True),
        ({"path": "/m/student", "lora_rank": 0}, {"path": "/m/teacher"}, False),  # a full student: verl's ref slot
        ({"path": "/m/student", "lora_rank": 8}, {"path": "/m/student/"}, False),  # the student's own base
        ({"path": "/m/student", "lora_rank": 8}, {"path": None}, False),
        ({"path": "/m/student", "lora_rank": 8}, None, False),
    ],
)
def test_which_lora_students_get_a_separate_teacher(model, teacher, separate):
    assert separate_teacher_for_lora_student(model, teacher) is separate


def test_the_students_base_is_recognised_through_links(tmp_path):
    (tmp_path / "student").mkdir()
    os.symlink(tmp_path / "student", tmp_path / "link")
    assert is_students_base(str(tmp_path / "link"), str(tmp_path / "student"))
    assert not is_students_base(str(tmp_path / "teacher"), str(tmp_path / "student"))


class FakeTrainingWorker:
    """What the routing uses of verl's TrainingWorker: infer_batch and the dispatch layout."""

    def __init__(self, name, layout=None):
        self.name, self.layout, self.received = name, layout or {"dispatch_dp_rank": {"train": 0}}, []

    def get_dispatch_collect(self):
        return self.layout

    def infer_batch(self, data):
        self.received.append({key: tu.get(data, key) for key in (ADAPTERS_OFF_KEY, "enable_routing_replay")})
        return self.name


def fake_worker(role="actor_rollout", lora_rank=8, teacher="/m/teacher"):
    config = OmegaConf.create(
        {"model": {"path": "/m/student", "lora_rank": lora_rank}, "ref": {"model": {"path": teacher}}}
    )
    return types.SimpleNamespace(role=role, config=config, actor=None, ref=None)


def verl_init_model_stand_in(worker):
    """Builds what verl's init_model builds for the worker's role (the reference only where it is named)."""
    worker.roles_seen = getattr(worker, "roles_seen", []) + [worker.role]
    if "ref" in worker.role:
        worker.ref = FakeTrainingWorker("teacher")
    if "actor" in worker.role:
        worker.actor = FakeTrainingWorker("actor")


def request(adapters_off: bool, routing_replay=None) -> TensorDict:
    data = TensorDict({"input_ids": torch.zeros(2, 3)}, batch_size=[2])
    if adapters_off:
        tu.assign_non_tensor(data, **{ADAPTERS_OFF_KEY: True})
    if routing_replay is not None:
        tu.assign_non_tensor(data, enable_routing_replay=routing_replay)
    return data


@pytest.mark.parametrize("role", ["actor_rollout", "actor"])
def test_the_lora_actor_worker_builds_the_teacher_and_answers_adapters_off_requests_with_it(role):
    worker = fake_worker(role)
    with_teacher_beside_lora_actor(verl_init_model_stand_in)(worker)
    assert worker.roles_seen == [f"{role}_ref"] and worker.role == role  # the role is verl's again afterwards
    actor, teacher = worker.actor, worker.ref

    assert actor.infer_batch(request(adapters_off=False)) == "actor"  # old log-probs: the student with adapters
    assert actor.infer_batch(request(adapters_off=True, routing_replay=True)) == "teacher"
    # the teacher sees verl's reference request, without the actor-only flags
    assert teacher.received == [{ADAPTERS_OFF_KEY: None, "enable_routing_replay": False}]
    assert actor.received == [{ADAPTERS_OFF_KEY: None, "enable_routing_replay": None}]


@pytest.mark.parametrize(
    "worker",
    [
        pytest.param(fake_worker(lora_rank=0), id="full student"),
        pytest.param(fake_worker(teacher="/m/student"), id="teacher = the student's base"),
        pytest.param(fake_worker(role="rollout"), id="no actor in the worker"),
    ],
)
def test_other_workers_are_built_as_verl_builds_them(worker):
    role = worker.role
    with_teacher_beside_lora_actor(verl_init_model_stand_in)(worker)
    assert worker.roles_seen == [role] and worker.ref is None


def test_a_teacher_split_across_ranks_unlike_the_actor_is_refused():
    def split_differently(worker):
        verl_init_model_stand_in(worker)
        worker.ref.layout = {"dispatch_dp_rank": {"train": 1}}

    with pytest.raises(LoRATeacherError, match="ulysses_sequence_parallel_size"):
        with_teacher_beside_lora_actor(split_differently)(fake_worker())


def test_a_lora_actor_without_its_teacher_is_refused():
    """verl's own build of a LoRA actor (no reference model) in a run the driver did not mark."""
    worker = fake_worker()
    verl_init_model_stand_in(worker)
    with pytest.raises(LoRATeacherError, match="VERL_DISTILL_LORA_TEACHER=1"):
        check_lora_student_has_its_teacher(worker)
    with_teacher_beside_lora_actor(verl_init_model_stand_in)(built := fake_worker())
    check_lora_student_has_its_teacher(built)
    student_as_teacher = fake_worker(teacher="/m/student")
    verl_init_model_stand_in(student_as_teacher)
    check_lora_student_has_its_teacher(student_as_teacher)  # verl's adapters-off reference is that model


def test_the_adaptation_holds_on_this_verl_and_wraps_init_model():
    from verl.workers import engine_workers

    module = types.SimpleNamespace(
        ActorRolloutRefWorker=type(
            "Worker",
            (),
            {
                "init_model": engine_workers.ActorRolloutRefWorker.init_model,
                "compute_log_prob": engine_workers.ActorRolloutRefWorker.compute_log_prob,
            },
        ),
        TrainingWorker=engine_workers.TrainingWorker,
    )
    verls = module.ActorRolloutRefWorker.init_model
    compat._teacher_beside_lora_actor(module)
    wrapped = module.ActorRolloutRefWorker.init_model
    assert wrapped is not verls and wrapped.__wrapped__ is verls
    assert wrapped.__code__ is with_teacher_beside_lora_actor(verls).__code__


def test_changed_verl_code_under_the_adaptation_fails_loudly():
    from verl.workers import engine_workers

    def compute_log_prob(self, data):
        return self.actor.infer_batch(data).cpu()

    module = types.SimpleNamespace(
        ActorRolloutRefWorker=type(
            "Worker", (), {"init_model": engine_workers.ActorRolloutRefWorker.init_model, "compute_log_prob": compute_log_prob}
        ),
        TrainingWorker=engine_workers.TrainingWorker,
    )
    with pytest.raises(compat.UnsupportedVerlError, match="compute_log_prob is not the code verl-distill was written"):
        compat._teacher_beside_lora_actor(module)
