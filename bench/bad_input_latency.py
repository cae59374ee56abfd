"""How long ``python -m verl.trainer.main_ppo`` takes to refuse bad input (goal: under 15 s).

The tests check that a refusal is one line and comes before Ray starts (structurally); the seconds
depend on the machine's load, so they are measured here, with the CPU time and the load average that
explain them. Each case is one trainer command line with one bad override on the toy assets.

    .venv/bin/python bench/bad_input_latency.py [--repeats 3] [--out bench/results/bad_input_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ToyAssets, format_table, machine_info

GOAL_S = 15.0

CASES = {
    "no teacher": ["actor_rollout_ref.ref.model.path=null"],
    "k1 as the loss": ["actor_rollout_ref.actor.kl_loss_type=k1"],
    "prompt longer than max_prompt_length": ["data.max_prompt_length=8"],
}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_refusal(assets: ToyAssets, overrides: list[str], scratch: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-name=distillation_trainer",
        f"data.train_files={assets.train_files}",
        f"data.val_files={assets.val_files}",
        f"actor_rollout_ref.model.path={assets.student}",
        f"actor_rollout_ref.ref.model.path={assets.teacher}",
        f"hydra.run.dir={scratch / 'hydra'}",
        *overrides,
    ]
    cpu_before, started = _children_cpu_s(), time.monotonic()
    result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=300, check=False)
    wall, cpu = time.monotonic() - started, _children_cpu_s() - cpu_before
    errors = [line for line in result.stderr.splitlines() if line.startswith("verl-distill: error:")]
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_average": round(os.getloadavg()[0], 2),
        "refused_in_one_line": result.returncode == 2 and len(errors) == 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    assets = ToyAssets.build()
    runs = {name: [] for name in CASES}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            for name, overrides in CASES.items():
                runs[name].append(time_refusal(assets, overrides, Path(scratch)))
    rows, summary = [], {}
    for name, measured in runs.items():
        median_wall = statistics.median(run["wall_s"] for run in measured)
        summary[name] = {"median_wall_s": median_wall, "runs": measured}
        rows.append(
            [
                name,
                median_wall,
                statistics.median(run["cpu_s"] for run in measured),
                max(run["load_average"] for run in measured),
                all(run["refused_in_one_line"] for run in measured),
            ]
        )
    print(format_table(["case", "median wall s", "median CPU s", "max load", "one-line refusal"], rows))
    worst = max(entry["median_wall_s"] for entry in summary.values())
    print(f"goal: every median under {GOAL_S:.0f} s: {'met' if worst < GOAL_S else 'not met'} (worst {worst:.1f} s)")
    if args.out:
        payload = {"goal_s": GOAL_S, "machine": machine_info(), "cases": summary}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
