"""Follow and plot a run's metrics as verl's ``file`` logger writes them: one JSON object per line,
``{"step": N, "data": {metric: value}}`` (the validation before training is logged at step 0).

``python -m verl.distill.training_log follow METRICS.jsonl --total_steps N --while_pid PID``
    one progress line, ``step 37/200  kl 0.41  val acc 0.84 (step 25)``, rewritten in place on a
    terminal (a new line per validation otherwise) until process PID exits;
``python -m verl.distill.training_log plot METRICS.jsonl OUT.png``
    the training curve: ``actor/kl_loss`` per step and the validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

KL_KEY = "actor/kl_loss"
# verl's validation metric of a labelled data source: val-core/<data_source>/acc/mean@<n>
VALIDATION_ACCURACY = re.compile(r"^val-core/.+/acc/mean@\d+$")


@dataclass(frozen=True)
class TrainingCurve:
    kl: list[tuple[int, float]]
    validation_accuracy: list[tuple[int, float]]

    @property
    def last_step(self) -> Optional[int]:
        return self.kl[-1][0] if self.kl else None


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of the file (a line still being written is left for the next read)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        if line.strip():
            rows.append(json.loads(line))
    return rows


def training_curve(rows: list[dict]) -> TrainingCurve:
    kl, accuracy = [], []
    for row in rows:
        data = row["data"]
        if KL_KEY in data:
            kl.append((row["step"], float(data[KL_KEY])))
        accuracies = [float(value) for key, value in data.items() if VALIDATION_ACCURACY.match(key)]
        if accuracies:
            # several labelled data sources: their mean, as one line of progress can show one number
            accuracy.append((row["step"], sum(accuracies) / len(accuracies)))
    return TrainingCurve(kl, accuracy)


def progress_line(curve: TrainingCurve, total_steps: int) -> str:
    parts = [f"step {curve.last_step or 0}/{total_steps}"]
    if curve.kl:
        parts.append(f"kl {curve.kl[-1][1]:.3f}")
    if curve.validation_accuracy:
        step, accuracy = curve.validation_accuracy[-1]
        parts.append(f"val acc {accuracy:.3f} (step {step})")
    return "  ".join(parts)


def follow(
    path: Path,
    total_steps: int,
    running: Callable[[], bool],
    stream: TextIO,
    interval_s: float = 1.0,
) -> TrainingCurve:
    """Report progress while ``running()``; returns the curve as last read."""
    in_place = stream.isatty()
    shown, validations_shown = "", 0
    while True:
        still_running = running()  # read before the file: the last read then sees every line of the run
        curve = training_curve(read_metrics(path))
        line = progress_line(curve, total_steps)
        if in_place and line != shown:
            # pad over the remains of a longer previous line
            stream.write("\r" + line.ljust(len(shown)))
            stream.flush()
            shown = line
        elif not in_place and len(curve.validation_accuracy) > validations_shown:
            stream.write(line + "\n")
            stream.flush()
            validations_shown = len(curve.validation_accuracy)
        if not still_running:
            break
        time.sleep(interval_s)
    if in_place and shown:
        stream.write("\n")
    return curve


def plot_training_curve(curve: TrainingCurve, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (kl_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if curve.kl:
        kl_axis.plot(*zip(*curve.kl, strict=True), linewidth=1)
    kl_axis.set_title(f"{KL_KEY} (training batch)")
    kl_axis.set_xlabel("training step")
    if curve.validation_accuracy:
        accuracy_axis.plot(*zip(*curve.validation_accuracy, strict=True), marker="o")
    accuracy_axis.set_ylim(-0.03, 1.03)
    accuracy_axis.set_title("validation accuracy")
    accuracy_axis.set_xlabel("training step")
    for axis in (kl_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # an exited child its parent has not reaped yet still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl.distill.training_log", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    follow_parser = commands.add_parser("follow", help="print training progress until a process exits")
    follow_parser.add_argument("metrics", type=Path, help="the run's metrics JSONL file")
    follow_parser.add_argument("--total_steps", type=int, required=True)
    follow_parser.add_argument("--while_pid", type=int, required=True, help="follow until this process exits")
    follow_parser.add_argument("--interval_s", type=float, default=1.0)
    plot_parser = commands.add_parser("plot", help="draw kl_loss per step and the validation accuracy")
    plot_parser.add_argument("metrics", type=Path, help="the run's metrics JSONL file")
    plot_parser.add_argument("png", type=Path)
    plot_parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    if args.command == "follow":
        if args.total_steps < 1 or not math.isfinite(args.interval_s) or args.interval_s <= 0:
            parser.error("--total_steps and --interval_s must be positive")
        follow(args.metrics, args.total_steps, lambda: _process_alive(args.while_pid), sys.stdout, args.interval_s)
        return 0
    curve = training_curve(read_metrics(args.metrics))
    if not curve.kl:
        problem = f"no {KL_KEY} logged; fix: pass the metrics file of a distillation run"
        print(f"error: {args.metrics}: {problem}", file=sys.stderr)
        return 2
    plot_training_curve(curve, args.png, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
