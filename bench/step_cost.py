"""Part 2, step cost: median seconds per training step after warm-up, on-policy distillation versus
GRPO with a reference-KL term, split into rollout (``timing_s/gen``), reference pass
(``timing_s/ref``: the teacher for distillation, the frozen reference for GRPO) and actor update
(``timing_s/update_actor``), through ``python -m verl.trainer.main_ppo`` on the CPU backend.

Arms, each with the same number of completions per step (``--completions``, default 64), one
optimiser step per batch, no validation, no checkpoints:

* ``distillation``: ``distillation_trainer`` as shipped (default loss: sampled-token ``low_var_kl``),
  one completion per prompt, the toy teacher in the reference slot;
* ``grpo_kl``: verl's ``ppo_trainer``, ``algorithm.adv_estimator=grpo``, ``rollout.n=4`` over
  completions/4 prompts, ``use_kl_loss=true`` with ``low_var_kl``, the toy exact-match reward. Its
  reference model is verl's usual frozen copy of the student, which on the toy task has exactly the
  teacher's size (same architecture, 335k parameters), so both reference passes cost the same;
* ``toy_recipe``: ``run_distillation.sh``'s toy recipe (``reverse_kl_topk`` over the full vocabulary,
  lr 1e-3, 10 warm-up steps): the verl side of the plain-loop overhead comparison (part 4), same
  config as ``bench/plain_loop.py``.

verl's v1 trainer polls finished rollouts every 2 s (hard-coded); verl-distill polls every
``VERL_DISTILL_ROLLOUT_POLL_S`` seconds (default 0.05), which every arm here uses alike.

    .venv/bin/python bench/step_cost.py --warmup 3 --steps 12 --rounds 2 --out step_cost.json
"""

from __future__ import annotations

import argparse
import os
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
from sample_efficiency import loss_overrides

GRPO_SAMPLES_PER_PROMPT = 4
# The toy recipe's peak lr and warm-up (examples/distillation/run_distillation.sh), also bench/plain_loop.py's
# defaults; the recipe's cosine decay after the warm-up does not change what a step costs.
RECIPE_LR = 1e-3
RECIPE_WARMUP_STEPS = 10

# What the comparison table shows, in order: verl's phase name -> column title.
SHOWN_PHASES = {
    "gen": "rollout",
    "ref": "ref pass",
    "update_actor": "update",
    "old_log_prob": "old logp",
    "step": "step",
}


@dataclass
class StepCostConfig:
    """completions: sampled completions per step in every arm. warmup: first steps left out of the
    medians. steps: measured steps after them. lr: of the distillation and GRPO arms (the step cost
    does not depend on it). with_recipe: also time the toy recipe (needed for the overhead ratio).
    rounds: runs per arm, interleaved (A B C A B C) so that a slow spell of the machine falls on
    every arm; the medians pool the measured steps of all rounds."""

    completions: int = 64
    warmup: int = 3
    steps: int = 12
    lr: float = 1e-4
    with_recipe: bool = True
    rounds: int = 2

    def __post_init__(self):
        if self.completions < GRPO_SAMPLES_PER_PROMPT or self.completions % GRPO_SAMPLES_PER_PROMPT:
            raise ValueError(
                f"--completions is {self.completions}: use a multiple of {GRPO_SAMPLES_PER_PROMPT} (GRPO's group size)"
            )
        if self.warmup < 0 or self.steps < 1 or self.rounds < 1:
            raise ValueError(
                f"--warmup {self.warmup}, --steps {self.steps}, --rounds {self.rounds}: "
                "use warmup >= 0, steps >= 1 and rounds >= 1"
            )


def specs(assets: ToyAssets, config: StepCostConfig) -> list[TrainerSpec]:
    total = config.warmup + config.steps
    quiet = ("trainer.test_freq=-1", "trainer.val_before_train=false")
    teacher = f"actor_rollout_ref.ref.model.path={assets.teacher}"
    arms = [
        TrainerSpec(
            "step-distillation",
            "distillation_trainer",
            (*toy_overrides(assets, batch_size=config.completions, lr=config.lr), teacher, *quiet),
            total,
        ),
        TrainerSpec(
            "step-grpo_kl",
            "ppo_trainer",
            (
                *toy_overrides(
                    assets,
                    batch_size=config.completions // GRPO_SAMPLES_PER_PROMPT,
                    lr=config.lr,
                    samples_per_prompt=GRPO_SAMPLES_PER_PROMPT,
                ),
                "algorithm.adv_estimator=grpo",
                "actor_rollout_ref.actor.use_kl_loss=true",
                "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
                "reward.reward_manager.name=naive",
                f"reward.custom_reward_function.path={toy_scorer_path()}",
                "reward.custom_reward_function.name=compute_score",
                *quiet,
            ),
            total,
        ),
    ]
    if config.with_recipe:
        arms.append(
            TrainerSpec(
                "step-toy_recipe",
                "distillation_trainer",
                (
                    *toy_overrides(
                        assets, batch_size=config.completions, lr=RECIPE_LR, warmup_steps=RECIPE_WARMUP_STEPS
                    ),
                    teacher,
                    *loss_overrides(assets, "reverse_kl_topk"),
                    *quiet,
                ),
                total,
            )
        )
    return arms


def run(assets: ToyAssets, config: StepCostConfig, workdir: Path, echo=print) -> Part:
    part = Part("step_cost")
    echo(
        f"step cost: {config.completions} completions per step, median of {config.steps} steps after "
        f"{config.warmup}, {config.rounds} interleaved round(s)"
    )
    arm_specs = {spec.label.removeprefix("step-"): spec for spec in specs(assets, config)}
    outcomes = run_interleaved_rounds(arm_specs, config.rounds, workdir, part, echo)
    arms = {}
    for name, runs in outcomes.items():
        failures = [run.failure() for run in runs if run.failure()]
        arms[name] = {
            "medians_s": phase_medians(runs, config.warmup) if not failures else None,
            "steps_logged": sum(len(run.training_steps()) for run in runs),
            "response_length_mean": pooled_median(runs, "response_length/mean", warmup=0),
            "failure": failures[0] if failures else None,
            "runs": [run.to_json() for run in runs],
        }

    def median(arm: str, phase: str) -> float | None:
        medians = arms.get(arm, {}).get("medians_s")
        return medians.get(phase) if medians else None

    headline = {
        "step_time_ratio_distill_over_grpo_kl": ratio(median("distillation", "step"), median("grpo_kl", "step")),
        "median_step_distill_s": median("distillation", "step"),
        "median_step_grpo_kl_s": median("grpo_kl", "step"),
        "median_step_toy_recipe_s": median("toy_recipe", "step"),
        "null_reasons": {},
    }
    for arm in ("distillation", "grpo_kl"):
        if median(arm, "step") is None:
            headline["null_reasons"]["step_time_ratio_distill_over_grpo_kl"] = (
                arms[arm]["failure"] or f"{arm}: no step after warm-up"
            )
    part.headline = headline
    part.details = {
        "config": asdict(config),
        "rollout_poll_s": float(os.environ.get("VERL_DISTILL_ROLLOUT_POLL_S", "0.05")),
        "phase_ratios_distill_over_grpo_kl": {
            phase: ratio(median("distillation", phase), median("grpo_kl", phase)) for phase in SHOWN_PHASES
        },
        "arms": arms,
    }
    rows = [
        [arm] + [median(arm, phase) for phase in SHOWN_PHASES] + [data["failure"] or ""] for arm, data in arms.items()
    ]
    rows.append(["distill / grpo_kl"] + list(part.details["phase_ratios_distill_over_grpo_kl"].values()) + [""])
    part.tables.append(format_table(["arm", *(f"{title} s" for title in SHOWN_PHASES.values()), "failure"], rows))
    return part


def main(argv: list[str] | None = None) -> int:
    defaults = StepCostConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--completions", type=int, default=defaults.completions, help="completions per step (default: %(default)s)")
    add("--warmup", type=int, default=defaults.warmup, help="steps left out of the medians (default: %(default)s)")
    add("--steps", type=int, default=defaults.steps, help="measured steps after warm-up (default: %(default)s)")
    add(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="runs per arm, interleaved; the medians pool them (default: %(default)s)",
    )
    add("--no-recipe", action="store_true", help="skip the toy-recipe arm (used only by the overhead comparison)")
    add("--workdir", default="bench/results/tmp/step_cost", help="run folders (default: %(default)s)")
    add("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        config = StepCostConfig(
            args.completions, args.warmup, args.steps, with_recipe=not args.no_recipe, rounds=args.rounds
        )
    except ValueError as error:
        parser.error(str(error))
    part = run(ToyAssets.build(), config, Path(args.workdir).resolve())
    part.report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
