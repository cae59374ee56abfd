"""Issue #14 item 1, selection strategies: what the teacher's reference pass costs when it scores all
``rollout.n`` responses of each prompt versus ``select_k`` of them, through ``python -m
verl.trainer.main_ppo`` on the CPU backend.

Arms: ``distillation_hybrid_trainer`` (GRPO, ``rollout.n=4``, the toy exact-match reward, the toy
teacher in the reference slot) with ``distill.select_strategy=all`` and with ``random`` / ``best`` at
``select_k`` (default 1), the same completions per step, interleaved rounds (A B C A B C) so that a
slow spell of the machine falls on every arm. Reported: median ``timing_s/ref`` and
``timing_s/step`` after warm-up, and the teacher's rows and tokens per step
(``distill/teacher_rows``, ``distill/teacher_tokens``; for ``all`` every row of the batch).

On the toy task the teacher (335k parameters) costs little next to verl's fixed per-phase machinery
(a Ray call, TransferQueue reads and writes), so the saving in seconds is far below the saving in rows;
with a teacher several times the student's size the forward dominates ``timing_s/ref``.

    .venv/bin/python bench/selection_cost.py --warmup 3 --steps 10 --rounds 2 --out bench/results/selection_cost.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    Part,
    ToyAssets,
    TrainerSpec,
    format_table,
    phase_medians,
    pooled_median,
    ratio,
    run_interleaved_rounds,
    toy_overrides,
    toy_scorer_path,
)

SAMPLES_PER_PROMPT = 4


@dataclass
class SelectionCostConfig:
    """completions: per step (prompts x rollout.n). select_k: responses per prompt the selecting arms
    have the teacher score. warmup: first steps left out of the medians. steps: measured steps after
    them. rounds: runs per arm, interleaved."""

    completions: int = 64
    select_k: int = 1
    warmup: int = 3
    steps: int = 10
    rounds: int = 2

    def __post_init__(self):
        if self.completions % SAMPLES_PER_PROMPT or not 1 <= self.select_k < SAMPLES_PER_PROMPT:
            raise ValueError(
                f"--completions {self.completions}, --select-k {self.select_k}: use a multiple of "
                f"{SAMPLES_PER_PROMPT} and 1 <= select_k < {SAMPLES_PER_PROMPT}"
            )
        if self.warmup < 0 or self.steps < 1 or self.rounds < 1:
            raise ValueError("use --warmup >= 0, --steps >= 1 and --rounds >= 1")


def specs(assets: ToyAssets, config: SelectionCostConfig) -> dict[str, TrainerSpec]:
    common = (
        *toy_overrides(
            assets,
            batch_size=config.completions // SAMPLES_PER_PROMPT,
            lr=1e-4,
            samples_per_prompt=SAMPLES_PER_PROMPT,
        ),
        f"actor_rollout_ref.ref.model.path={assets.teacher}",
        f"reward.custom_reward_function.path={toy_scorer_path()}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
    )
    arms = {"all": ("actor_rollout_ref.actor.distill.select_strategy=all",)}
    for strategy in ("random", "best"):
        arms[f"{strategy} k={config.select_k}"] = (
            f"actor_rollout_ref.actor.distill.select_strategy={strategy}",
            f"actor_rollout_ref.actor.distill.select_k={config.select_k}",
        )
    total = config.warmup + config.steps
    return {
        name: TrainerSpec(f"select-{name.replace(' ', '').replace('=', '')}", "distillation_hybrid_trainer", (*common, *extra), total)
        for name, extra in arms.items()
    }


def run(assets: ToyAssets, config: SelectionCostConfig, workdir: Path, echo=print) -> Part:
    part = Part("selection_cost")
    echo(
        f"selection cost: {config.completions} completions per step (rollout.n={SAMPLES_PER_PROMPT}), "
        f"median of {config.steps} steps after {config.warmup}, {config.rounds} interleaved round(s)"
    )
    outcomes = run_interleaved_rounds(specs(assets, config), config.rounds, workdir, part, echo)

    arms = {}
    for name, runs in outcomes.items():
        failures = [run.failure() for run in runs if run.failure()]
        medians = phase_medians(runs, config.warmup) if not failures else {}
        selecting = name != "all"
        arms[name] = {
            "ref_s": medians.get("ref"),
            "step_s": medians.get("step"),
            "teacher_rows": pooled_median(runs, "distill/teacher_rows", config.warmup) if selecting else config.completions,
            "teacher_tokens": pooled_median(runs, "distill/teacher_tokens", config.warmup) if selecting else None,
            "teacher_token_share": pooled_median(runs, "distill/teacher_token_share", config.warmup) if selecting else 1.0,
            "select_ratio": pooled_median(runs, "distill/select_ratio", config.warmup) if selecting else 1.0,
            "failure": failures[0] if failures else None,
            "runs": [run.to_json() for run in runs],
        }
    for name, arm in arms.items():
        arm["ref_s_over_all"] = ratio(arm["ref_s"], arms["all"]["ref_s"])
        arm["step_s_over_all"] = ratio(arm["step_s"], arms["all"]["step_s"])

    part.headline = {
        f"ref_s_ratio_{name.replace(' ', '_').replace('=', '')}_over_all": arm["ref_s_over_all"]
        for name, arm in arms.items()
        if name != "all"
    }
    part.details = {"config": asdict(config), "arms": arms}
    columns = ("ref_s", "ref_s_over_all", "step_s", "step_s_over_all", "teacher_rows", "teacher_token_share", "select_ratio")
    rows = [[name, *(arm[column] for column in columns), arm["failure"] or ""] for name, arm in arms.items()]
    part.tables.append(format_table(["arm", *columns, "failure"], rows))
    return part


def main(argv: list[str] | None = None) -> int:
    defaults = SelectionCostConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--completions", type=int, default=defaults.completions, help="completions per step (default: %(default)s)")
    add("--select-k", type=int, default=defaults.select_k, help="responses per prompt the teacher scores (default: %(default)s)")
    add("--warmup", type=int, default=defaults.warmup, help="steps left out of the medians (default: %(default)s)")
    add("--steps", type=int, default=defaults.steps, help="measured steps after warm-up (default: %(default)s)")
    add("--rounds", type=int, default=defaults.rounds, help="runs per arm, interleaved (default: %(default)s)")
    add("--workdir", default="bench/results/tmp/selection_cost", help="run folders (default: %(default)s)")
    add("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        config = SelectionCostConfig(args.completions, args.select_k, args.warmup, args.steps, args.rounds)
    except ValueError as error:
        parser.error(str(error))
    part = run(ToyAssets.build(), config, Path(args.workdir).resolve())
    part.report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
