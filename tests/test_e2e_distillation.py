"""The product, end to end on a CPU: `--config-name=distillation_trainer` with a teacher in the ref slot."""

import hashlib
import time
from pathlib import Path

import pytest
from trainer_runs import TINY_RUN, run_trainer

pytestmark = pytest.mark.slow


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _distillation(tiny_assets, teacher=None):
    return [
        f"data.train_files={tiny_assets.train_files}",
        f"data.val_files={tiny_assets.val_files}",
        f"actor_rollout_ref.model.path={tiny_assets.student}",
        f"actor_rollout_ref.ref.model.path={teacher or tiny_assets.teacher}",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        *TINY_RUN,
    ]


def test_student_moves_toward_a_different_teacher(tiny_assets, tmp_path):
    teacher_before = _weights_digest(tiny_assets.teacher)
    run = run_trainer(
        tmp_path, [*_distillation(tiny_assets), "trainer.total_training_steps=8"], config_name="distillation_trainer"
    )
    assert run.returncode == 0, run.explain()
    kl = run.series("actor/kl_loss")
    assert len(kl) == 8
    assert kl[-1] < kl[0], kl
    assert run.series("actor/pg_loss") == [0.0] * 8
    assert run.series("actor/distillation_mode") == [1.0] * 8
    teacher_lp, student_lp = run.series("actor/teacher_log_prob_mean"), run.series("actor/student_log_prob_mean")
    assert abs(teacher_lp[0] - student_lp[0]) > 0.5, "the ref slot must hold the teacher, not a copy of the student"
    assert run.series("timing_s/ref")
    assert _weights_digest(tiny_assets.teacher) == teacher_before


def test_teacher_equal_to_student_gives_zero_kl(tiny_assets, tmp_path):
    run = run_trainer(
        tmp_path,
        [*_distillation(tiny_assets, teacher=tiny_assets.student), "trainer.total_training_steps=1"],
        config_name="distillation_trainer",
    )
    assert run.returncode == 0, run.explain()
    assert run.series("actor/kl_loss")[0] < 1e-3


@pytest.mark.parametrize(
    "override, key",
    [
        ("actor_rollout_ref.ref.model.path=null", "actor_rollout_ref.ref.model.path"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=nonsense", "actor_rollout_ref.actor.policy_loss.loss_mode"),
        ("actor_rollout_ref.actor.kl_loss_type=k1", "actor_rollout_ref.actor.kl_loss_type"),
    ],
)
def test_bad_input_is_one_line_before_ray(tiny_assets, tmp_path, override, key):
    started = time.monotonic()
    run = run_trainer(tmp_path, [*_distillation(tiny_assets), override], config_name="distillation_trainer", timeout=120)
    assert run.returncode == 2
    assert time.monotonic() - started < 30
    errors = [line for line in run.stderr.splitlines() if line.startswith("verl-distill: error:")]
    assert len(errors) == 1 and key in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "ray init kwargs" not in run.stdout
