"""A resumed run keeps the metrics its earlier steps wrote (verl's file logger truncated them)."""

import json

import verl.distill.plugin  # noqa: F401  (installs the adaptations, as verl's plugin loader does)
from verl.utils import tracking


def _log_steps(steps: range) -> None:
    logger = tracking.FileLogger("project", "experiment")
    for step in steps:
        logger.log({"actor/kl_loss": float(step)}, step=step)
    logger.finish()


def test_a_second_run_with_the_same_path_appends(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(metrics))
    _log_steps(range(1, 4))
    _log_steps(range(3, 5))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 3, 4]


def test_the_root_layout_is_verls(tmp_path, monkeypatch):
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path / "logs"))
    _log_steps(range(1, 3))
    _log_steps(range(3, 4))
    lines = (tmp_path / "logs" / "project" / "experiment.jsonl").read_text().splitlines()
    assert [json.loads(line)["data"]["actor/kl_loss"] for line in lines] == [1.0, 2.0, 3.0]
