"""Part 3, scaling: seconds per step and peak memory of the default distillation step against the
batch size (prompts per step, one completion each) and the response length.

Every point is one short ``python -m verl.trainer.main_ppo --config-name=distillation_trainer`` run
(few steps; median after warm-up). Generation ignores the end-of-sequence token
(``actor_rollout_ref.rollout.ignore_eos=true``) so that every response is exactly
``data.max_response_length`` tokens long: the toy answers are 2-4 tokens, and without it a longer
limit would change nothing. Peak memory is the largest sum of RSS over every process of the run's
session (driver, Ray's servers and workers), sampled every 0.5 s; pages shared between processes are
counted in each, so the absolute value overstates physical use, and the growth between points is
the informative part.

    .venv/bin/python bench/scaling.py --batch-sizes 4,8,16,32 --response-lengths 8,16,32 --out scaling.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import (
    TOY_RESPONSE_LENGTH,
    Part,
    ToyAssets,
    TrainerSpec,
    format_table,
    phase_medians,
    run_trainer,
    toy_overrides,
)


@dataclass
class ScalingConfig:
    """batch_sizes: swept at response length TOY_RESPONSE_LENGTH (8). response_lengths: swept at
    length_sweep_batch_size prompts. warmup / steps: per point, as in step_cost. lr: does not
    affect the cost."""

    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    response_lengths: list[int] = field(default_factory=lambda: [8, 16, 32])
    length_sweep_batch_size: int = 16
    warmup: int = 2
    steps: int = 4
    lr: float = 1e-4

    def __post_init__(self):
        for value in [*self.batch_sizes, *self.response_lengths, self.length_sweep_batch_size, self.steps]:
            if value < 1:
                raise ValueError(f"scaling: {value} is not a positive integer (batch sizes, lengths, steps)")

    def points(self) -> list[tuple[int, int]]:
        """(batch size, response length), each once, in run order."""
        points = [(batch, TOY_RESPONSE_LENGTH) for batch in self.batch_sizes]
        points += [(self.length_sweep_batch_size, length) for length in self.response_lengths]
        return list(dict.fromkeys(points))


def run(assets: ToyAssets, config: ScalingConfig, workdir: Path, echo=print) -> Part:
    part = Part("scaling")
    echo(f"scaling: {len(config.points())} points, median of {config.steps} steps after {config.warmup}")
    points = []
    for batch_size, length in config.points():
        spec = TrainerSpec(
            f"scale-b{batch_size}-r{length}",
            "distillation_trainer",
            (
                *toy_overrides(assets, batch_size=batch_size, lr=config.lr, response_length=length),
                f"actor_rollout_ref.ref.model.path={assets.teacher}",
                "actor_rollout_ref.rollout.ignore_eos=true",
                "trainer.test_freq=-1",
                "trainer.val_before_train=false",
            ),
            config.warmup + config.steps,
        )
        outcome = run_trainer(spec, workdir / spec.label, sample_memory=True, echo=echo)
        medians = phase_medians(outcome, config.warmup) if outcome.ok else {}
        response_lengths = [row.get("response_length/mean") for row in outcome.training_steps()]
        points.append(
            {
                "batch_size": batch_size,
                "response_length": length,
                "measured_response_length": max(
                    (value for value in response_lengths if value is not None), default=None
                ),
                "median_step_s": medians.get("step"),
                "medians_s": medians,
                "peak_rss_gib": outcome.peak_rss_bytes / 2**30 if outcome.peak_rss_bytes else None,
                "failure": outcome.failure(),
                "run": outcome.to_json(),
            }
        )
        part.commands.append(outcome.command)
    part.details = {"config": asdict(config), "points": points}
    part.headline = {
        "scaling_step_s_by_batch": {
            str(point["batch_size"]): point["median_step_s"]
            for point in points
            if point["response_length"] == TOY_RESPONSE_LENGTH
        },
        "scaling_step_s_by_response_length": {
            str(point["response_length"]): point["median_step_s"]
            for point in points
            if point["batch_size"] == config.length_sweep_batch_size
        },
        "scaling_peak_rss_gib_max": max((point["peak_rss_gib"] or 0.0 for point in points), default=None) or None,
    }
    rows = [
        [
            point["batch_size"],
            point["response_length"],
            point["median_step_s"],
            point["medians_s"].get("gen"),
            point["medians_s"].get("ref"),
            point["medians_s"].get("update_actor"),
            point["peak_rss_gib"],
            point["failure"] or "",
        ]
        for point in points
    ]
    part.tables.append(
        format_table(["batch", "resp len", "step s", "rollout s", "ref s", "update s", "peak RSS GiB", "failure"], rows)
    )
    return part


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    defaults = ScalingConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--batch-sizes", type=int_list, default=defaults.batch_sizes, help="comma-separated (default: 4,8,16,32)")
    add(
        "--response-lengths",
        type=int_list,
        default=defaults.response_lengths,
        help="comma-separated (default: 8,16,32)",
    )
    add("--length-sweep-batch-size", type=int, default=defaults.length_sweep_batch_size, help="(default: %(default)s)")
    add("--warmup", type=int, default=defaults.warmup, help="steps left out of the medians (default: %(default)s)")
    add("--steps", type=int, default=defaults.steps, help="measured steps per point (default: %(default)s)")
    add("--workdir", default="bench/results/tmp/scaling", help="run folders (default: %(default)s)")
    add("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        config = ScalingConfig(
            args.batch_sizes, args.response_lengths, args.length_sweep_batch_size, args.warmup, args.steps
        )
    except ValueError as error:
        parser.error(str(error))
    part = run(ToyAssets.build(), config, Path(args.workdir).resolve())
    part.report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
