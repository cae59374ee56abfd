"""Run ``python -m verl.trainer.main_ppo`` as a user would, and read back what it logged."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Small enough for a 2-core machine, large enough to exercise every phase of a step.
TINY_RUN = [
    "data.train_batch_size=4",
    "data.max_prompt_length=32",
    "data.max_response_length=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
    "trainer.save_freq=-1",
    "trainer.project_name=tests",
    "trainer.experiment_name=run",
]


def models_and_data(assets) -> list[str]:
    """The overrides naming a model pair's student, teacher, and training and validation files."""
    return [
        f"data.train_files={assets.train_files}",
        f"data.val_files={assets.val_files}",
        f"actor_rollout_ref.model.path={assets.student}",
        f"actor_rollout_ref.ref.model.path={assets.teacher}",
    ]


@dataclass
class TrainerRun:
    returncode: int
    stdout: str
    stderr: str
    metrics: list[dict] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [row["data"][key] for row in self.metrics if key in row["data"]]

    def steps(self) -> list[int]:
        return [row["step"] for row in self.metrics]

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stderr (tail) ---\n{self.stderr[-6000:]}"


def run_trainer(
    workdir: Path,
    overrides: list[str],
    config_name: str = "ppo_trainer",
    timeout: int = 900,
    ray_tmpdir: Path | None = None,
) -> TrainerRun:
    """``ray_tmpdir``: Ray's temporary root for this run (``RAY_TMPDIR``); see :func:`ray_started`."""
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_file = workdir / f"metrics-{len(list(workdir.glob('metrics-*.jsonl')))}.jsonl"
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics_file), HYDRA_FULL_ERROR="0")
    # the test process's own marks (conftest): the trainer's driver decides them for its run
    for decided_by_the_driver in ("VERL_PLATFORM", "VERL_DISTILL_RUN", "VERL_DISTILL_SELECT"):
        env.pop(decided_by_the_driver, None)
    if ray_tmpdir is not None:
        env["RAY_TMPDIR"] = str(ray_tmpdir)
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        f"--config-name={config_name}",
        "trainer.logger=[console,file]",
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        f"hydra.run.dir={workdir / 'hydra'}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    metrics = []
    if metrics_file.exists():
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return TrainerRun(result.returncode, result.stdout, result.stderr, metrics)


def ray_started(ray_tmpdir: Path) -> bool:
    """Whether a run given ``ray_tmpdir`` started Ray: ``ray.init`` creates ``<RAY_TMPDIR>/ray/session_*``
    before anything else. A structural check, unlike a wall-time bound, holds on a loaded machine."""
    return any((ray_tmpdir / "ray").glob("session_*"))


@pytest.fixture
def ray_tmpdir():
    """A fresh, short ``RAY_TMPDIR`` (Ray's socket paths under it must stay below the 107-byte limit
    of a Unix socket path, which pytest's tmp_path can exceed)."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
