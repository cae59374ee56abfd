"""The demo's progress line and training curve, read from verl's file-logger JSONL."""

import io
import json
import subprocess
import sys

import pytest

from verl.distill import training_log

VAL_KEY = "val-core/toy_addition/acc/mean@1"


def _write(path, rows, partial_tail: str = ""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + partial_tail)


def _rows():
    return [
        {"step": 0, "data": {VAL_KEY: 0.30}},
        {"step": 1, "data": {"actor/kl_loss": 1.5, "actor/lr": 1e-4}},
        {"step": 2, "data": {"actor/kl_loss": 1.2, VAL_KEY: 0.55}},
        {"step": 3, "data": {"actor/kl_loss": 0.9}},
    ]


def test_curve_and_progress_line_follow_the_logged_steps(tmp_path):
    metrics = tmp_path / "toy.jsonl"
    _write(metrics, _rows(), partial_tail='{"step": 4, "data": {"actor/kl')  # the logger is mid-line
    curve = training_log.training_curve(training_log.read_metrics(metrics))
    assert curve.kl == [(1, 1.5), (2, 1.2), (3, 0.9)]
    assert curve.validation_accuracy == [(0, 0.30), (2, 0.55)]
    assert training_log.progress_line(curve, 200) == "step 3/200  kl 0.900  val acc 0.550 (step 2)"


def test_progress_line_before_the_first_step(tmp_path):
    curve = training_log.training_curve(training_log.read_metrics(tmp_path / "not-yet-written.jsonl"))
    assert training_log.progress_line(curve, 50) == "step 0/50"


def test_several_labelled_sources_are_averaged():
    rows = [{"step": 5, "data": {VAL_KEY: 0.5, "val-core/gsm8k/acc/mean@1": 0.7, "val-core/gsm8k/reward/mean@1": 0}}]
    assert training_log.training_curve(rows).validation_accuracy == [(5, pytest.approx(0.6))]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_follow_rewrites_one_line_on_a_terminal_until_the_run_ends(tmp_path):
    metrics = tmp_path / "toy.jsonl"
    polls = iter(range(len(_rows())))

    def running():
        # each poll the run logs one more step; the last poll sees it finished
        logged = next(polls)
        _write(metrics, _rows()[: logged + 1])
        return logged < len(_rows()) - 1

    terminal = _Terminal()
    curve = training_log.follow(metrics, 3, running, terminal, interval_s=0)
    assert curve.last_step == 3
    output = terminal.getvalue()
    assert output.endswith("\n") and output.count("\n") == 1
    frames = output.rstrip("\n").split("\r")[1:]
    assert frames[-1] == "step 3/3  kl 0.900  val acc 0.550 (step 2)"
    assert all(len(frame) >= len(previous) for previous, frame in zip(frames, frames[1:], strict=False))


def test_follow_prints_one_line_per_validation_into_a_file(tmp_path):
    metrics = tmp_path / "toy.jsonl"
    _write(metrics, _rows())
    log = io.StringIO()
    training_log.follow(metrics, 3, lambda: False, log, interval_s=0)
    assert log.getvalue() == "step 3/3  kl 0.900  val acc 0.550 (step 2)\n"


def test_plot_draws_kl_per_step_and_validation_accuracy(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    drawn = []
    real_plot = plt.Axes.plot

    def recording_plot(axis, *args, **kwargs):
        drawn.append((list(args[0]), list(args[1])))
        return real_plot(axis, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "plot", recording_plot)
    png = tmp_path / "eval" / "training_curve.png"
    training_log.plot_training_curve(training_log.training_curve(_rows()), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == [([1, 2, 3], [1.5, 1.2, 0.9]), ([0, 2], [0.30, 0.55])]


def test_plot_of_a_file_without_kl_is_one_line(tmp_path):
    metrics = tmp_path / "empty.jsonl"
    metrics.write_text("")
    completed = subprocess.run(
        [sys.executable, "-m", "verl.distill.training_log", "plot", str(metrics), str(tmp_path / "out.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: {metrics}: no actor/kl_loss logged; fix: pass the metrics file of a distillation run"
    ]
    assert not (tmp_path / "out.png").exists()


def test_follow_command_returns_once_the_followed_process_has_exited(tmp_path):
    metrics = tmp_path / "toy.jsonl"
    _write(metrics, _rows())
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl.distill.training_log",
            "follow",
            str(metrics),
            "--total_steps",
            "3",
            "--while_pid",
            str(finished.pid),
            "--interval_s",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "step 3/3  kl 0.900  val acc 0.550 (step 2)\n"
