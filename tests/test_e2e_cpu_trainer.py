"""The stock entry point trains on a CPU: GRPO, GRPO with a KL loss, checkpoint and resume, bad input."""

import os
import subprocess
import sys

import pytest
from trainer_runs import ray_tmpdir  # noqa: F401  (a fixture)
from trainer_runs import TINY_RUN, ray_started, run_trainer

pytestmark = pytest.mark.slow


def _grpo(tiny_assets):
    return [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={tiny_assets.train_files}",
        f"data.val_files={tiny_assets.val_files}",
        f"actor_rollout_ref.model.path={tiny_assets.student}",
        "actor_rollout_ref.rollout.n=2",
        *TINY_RUN,
    ]


def test_grpo_with_kl_loss_trains_checkpoints_and_resumes_at_the_next_step(tiny_assets, tmp_path):
    grpo_with_kl_loss = [*_grpo(tiny_assets), "actor_rollout_ref.actor.use_kl_loss=true"]
    first = run_trainer(tmp_path, [*grpo_with_kl_loss, "trainer.total_training_steps=1", "trainer.save_freq=1"])
    assert first.returncode == 0, first.explain()
    assert "verl-distill: CPU job, adapted the config for the CPU" in first.stderr + first.stdout
    assert "actor_rollout_ref.rollout.name=hf" in first.stderr + first.stdout
    assert (tmp_path / "checkpoints" / "global_step_1" / "actor").is_dir()
    resumed = run_trainer(tmp_path, [*grpo_with_kl_loss, "trainer.total_training_steps=2", "trainer.resume_mode=auto"])
    assert resumed.returncode == 0, resumed.explain()
    assert first.steps() == [1] and resumed.steps() == [2]
    for run in (first, resumed):
        assert len(run.series("actor/pg_loss")) == 1
        kl = run.series("actor/kl_loss")
        assert len(kl) == 1 and kl[0] >= 0
        assert run.series("timing_s/ref")


def test_gpu_rollout_on_a_cpu_fails_in_one_line_before_ray(tiny_assets, tmp_path, ray_tmpdir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl.trainer.main_ppo",
            *_grpo(tiny_assets),
            "actor_rollout_ref.rollout.name=vllm",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, RAY_TMPDIR=str(ray_tmpdir)),
    )
    assert result.returncode == 2
    assert not ray_started(ray_tmpdir)
    error_lines = [line for line in result.stderr.splitlines() if "verl-distill: error:" in line]
    assert len(error_lines) == 1 and "actor_rollout_ref.rollout.name=vllm" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert "ray" not in result.stdout.lower() or "ray init kwargs" not in result.stdout
