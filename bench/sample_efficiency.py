"""Part 1, sample efficiency: steps, sampled completions and training wall time until the student
reaches a fraction (default 0.9) of the teacher's validation accuracy, for every distillation loss
mode versus GRPO with an exact-match reward, all through ``python -m verl.trainer.main_ppo`` on the
same CPU backend, same student start, same prompts in the same order, same batch of prompts.

Arms (one trainer run each, per learning rate of the method's grid):

* distillation modes, teacher in the reference slot, one completion per prompt:
  ``distillation`` (the default loss: sampled-token ``low_var_kl``), ``opd``
  (``distillation_opd_trainer``: verl's policy loss on the teacher's per-token log-ratio),
  ``forward_kl_topk``, ``reverse_kl_topk``, ``jsd_topk`` (with ``distill.topk`` = the toy vocabulary
  size: the exact full-vocabulary divergence, as the toy recipe ``run_distillation.sh`` uses);
* ``grpo``: verl's ``ppo_trainer`` with ``algorithm.adv_estimator=grpo``, ``rollout.n`` completions per
  prompt (default 4: GRPO needs a group to compare rewards within), the toy task's exact-match scorer
  as reward through verl's ``naive`` reward manager, no KL term, no teacher.

Validation is verl's own (``trainer.test_freq``, greedy, on the first ``--val-size`` rows of the toy
validation split): ``val-core/toy_addition/acc/mean@1`` for the distillation reward manager,
``.../reward/mean@1`` (the same 1/0 exact match) for GRPO. A run is stopped as soon as a validation
reaches the target, so steps to target are known to within ``--eval-every`` steps. Training wall time
is the sum of verl's ``timing_s/step`` (validation and start-up excluded).

Budgets. Each arm has a step cap; within one mode a later learning rate of the grid only gets the
steps the best earlier one needed (it cannot beat it beyond that). An arm whose accuracy falls below
half its start from step DIVERGENCE_MIN_STEP on has diverged and is stopped. With ``--se-minutes``
the arms also share a wall-time budget, in the order and with the weights of ``plan_arms``: each arm
may use the time left x its weight / the weights of the arms still to run, so time one arm does not
use goes to the later ones, and an arm whose share would be under MIN_ARM_TIME_S is not run (listed
in ``arms_not_run``). When no GRPO arm reaches the target, the GRPO/distillation ratios are lower
bounds from the last validated step of the shortest non-diverged GRPO arm, and flagged so
(``ratios_are_lower_bounds``).

    .venv/bin/python bench/sample_efficiency.py --modes distillation,reverse_kl_topk --distill-lrs 1e-3 \\
        --grpo-lrs 1e-3 --distill-budget-steps 150 --grpo-budget-steps 300 --se-minutes 30 --out se.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import (
    Part,
    RunOutcome,
    ToyAssets,
    TrainerSpec,
    format_table,
    greedy_accuracies,
    median_after_warmup,
    ratio,
    run_trainer,
    toy_overrides,
    toy_scorer_path,
    val_accuracy_key,
    write_val_subset,
)

# mode -> (config name, policy_loss.loss_mode override or None). The top-k modes run with
# distill.topk = the vocabulary size: the exact full-vocabulary divergence, as the toy recipe uses.
DISTILLATION_MODES: dict[str, tuple[str, str | None]] = {
    "distillation": ("distillation_trainer", None),
    "opd": ("distillation_opd_trainer", None),
    "forward_kl_topk": ("distillation_trainer", "forward_kl_topk"),
    "reverse_kl_topk": ("distillation_trainer", "reverse_kl_topk"),
    "jsd_topk": ("distillation_trainer", "jsd_topk"),
}


def loss_overrides(assets: ToyAssets, loss_mode: str | None) -> list[str]:
    if loss_mode is None:
        return []
    overrides = [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}"]
    if loss_mode.endswith("_topk"):
        overrides.append(f"actor_rollout_ref.actor.distill.topk={assets.vocab_size}")
    return overrides


GRPO = "grpo"

# An arm whose validation accuracy, at or after this step, falls below this fraction of its start has
# diverged (a learning rate too high for the method): it is stopped, and it never counts as reaching
# the target or as a bound on GRPO's steps.
DIVERGENCE_MIN_STEP = 30
DIVERGENCE_FRACTION = 0.5


@dataclass
class SampleEfficiencyConfig:
    """modes: distillation modes to run (keys of DISTILLATION_MODES). distill_lrs / grpo_lrs: the
    learning-rate grids, tried in order. batch_size: prompts per step. grpo_samples_per_prompt: GRPO's
    rollout.n. distill_budget_steps / grpo_budget_steps: step caps per arm. eval_every: steps between
    validations. val_size: validation rows (0: all). warmup_steps: linear lr warm-up (both methods).
    target_fraction: of the teacher's validation accuracy. time_budget_s: wall time of all arms
    together (None: step caps only), shared as ``plan_arms`` describes. grpo_time_weight: a GRPO arm's
    share relative to a distillation arm's (a GRPO step samples rollout.n times more)."""

    modes: list[str] = field(default_factory=lambda: list(DISTILLATION_MODES))
    distill_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-4])
    grpo_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3])
    batch_size: int = 64
    grpo_samples_per_prompt: int = 4
    distill_budget_steps: int = 200
    grpo_budget_steps: int = 400
    eval_every: int = 10
    val_size: int = 256
    warmup_steps: int = 10
    target_fraction: float = 0.9
    time_budget_s: float | None = None
    grpo_time_weight: float = 6.0

    def __post_init__(self):
        unknown = [mode for mode in self.modes if mode not in DISTILLATION_MODES]
        if unknown:
            raise ValueError(f"--modes: unknown {unknown}; choose from {', '.join(DISTILLATION_MODES)}")
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--grpo-n", self.grpo_samples_per_prompt),
            ("--eval-every", self.eval_every),
        ):
            if value < 1:
                raise ValueError(f"{flag} is {value}: use a positive integer")
        for flag, lrs in (("--distill-lrs", self.distill_lrs), ("--grpo-lrs", self.grpo_lrs)):
            if not lrs or any(lr <= 0 for lr in lrs):
                raise ValueError(f"{flag} is {lrs}: give one or more positive learning rates, e.g. 1e-3,3e-4")
        if not 0 < self.target_fraction <= 1:
            raise ValueError(f"--target-fraction is {self.target_fraction}: use a value in (0, 1]")


@dataclass
class ArmResult:
    """One trainer run: ``*_to_target`` are None when the target was not reached; ``steps_run``,
    ``samples_run`` and ``train_wall_s`` are what the run used up either way. An arm that missed the
    target is known to need more than ``last_validated_step`` steps (not more than ``steps_run``:
    the steps after the last validation were not evaluated)."""

    method: str
    mode: str
    lr: float
    budget_steps: int
    samples_per_step: int
    reached: bool
    steps_to_target: int | None
    samples_to_target: int | None
    train_wall_to_target_s: float | None
    steps_run: int
    samples_run: int
    train_wall_s: float
    last_validated_step: int
    train_wall_at_last_validation_s: float
    time_cap_s: float | None
    capped: bool
    diverged: bool
    start_accuracy: float | None
    best_accuracy: float | None
    median_step_s: float | None
    curve: list[dict]
    failure: str | None
    run: dict


def measure_arm(
    outcome: RunOutcome,
    method: str,
    mode: str,
    lr: float,
    budget: int,
    samples_per_step: int,
    target: float,
    time_cap_s: float | None,
) -> ArmResult:
    steps = outcome.training_steps()
    step_seconds = [row["timing_s/step"] for row in steps]
    cumulative, total = [], 0.0
    for seconds in step_seconds:
        total += seconds
        cumulative.append(total)
    curve = [
        {"step": step, "train_wall_s": cumulative[step - 1] if 0 < step <= len(cumulative) else 0.0, "acc": accuracy}
        for step, accuracy in outcome.val_curve()
    ]
    reached = next((point for point in curve if point["step"] > 0 and point["acc"] >= target), None)
    trained = [point["acc"] for point in curve]
    start = next((point["acc"] for point in curve if point["step"] == 0), None)
    last_validation = max(curve, key=lambda point: point["step"], default={"step": 0, "train_wall_s": 0.0})
    return ArmResult(
        method=method,
        mode=mode,
        lr=lr,
        budget_steps=budget,
        samples_per_step=samples_per_step,
        reached=reached is not None,
        steps_to_target=reached["step"] if reached else None,
        samples_to_target=reached["step"] * samples_per_step if reached else None,
        train_wall_to_target_s=reached["train_wall_s"] if reached else None,
        steps_run=len(step_seconds),
        samples_run=len(step_seconds) * samples_per_step,
        train_wall_s=total,
        last_validated_step=last_validation["step"],
        train_wall_at_last_validation_s=last_validation["train_wall_s"],
        time_cap_s=time_cap_s,
        capped=outcome.capped,
        diverged=reached is None and diverged([(point["step"], point["acc"]) for point in curve]),
        start_accuracy=start,
        best_accuracy=max(trained) if trained else None,
        median_step_s=median_after_warmup(step_seconds, 1),  # the first step includes lazy set-up
        curve=curve,
        failure=outcome.failure(),
        run=outcome.to_json(),
    )


def arm_spec(
    assets: ToyAssets, config: SampleEfficiencyConfig, val_file: Path, mode: str, lr: float, budget: int
) -> TrainerSpec:
    common = [
        f"trainer.test_freq={config.eval_every}",
        "trainer.val_before_train=true",
    ]
    if mode == GRPO:
        overrides = toy_overrides(
            assets,
            batch_size=config.batch_size,
            lr=lr,
            val_files=val_file,
            samples_per_prompt=config.grpo_samples_per_prompt,
            warmup_steps=config.warmup_steps,
        ) + [
            "algorithm.adv_estimator=grpo",
            "reward.reward_manager.name=naive",
            f"reward.custom_reward_function.path={toy_scorer_path()}",
            "reward.custom_reward_function.name=compute_score",
            "actor_rollout_ref.actor.use_kl_loss=false",
            "algorithm.use_kl_in_reward=false",
        ]
        return TrainerSpec(f"se-grpo-lr{lr:g}", "ppo_trainer", tuple(overrides + common), budget)
    config_name, loss_mode = DISTILLATION_MODES[mode]
    overrides = toy_overrides(
        assets, batch_size=config.batch_size, lr=lr, val_files=val_file, warmup_steps=config.warmup_steps
    ) + [f"actor_rollout_ref.ref.model.path={assets.teacher}", *loss_overrides(assets, loss_mode)]
    return TrainerSpec(f"se-{mode}-lr{lr:g}", config_name, tuple(overrides + common), budget)


def diverged(curve: list[tuple[int, float]]) -> bool:
    """``curve``: (step, accuracy) of an arm's validations, step 0 first."""
    if not curve or curve[0][0] != 0:
        return False
    start = curve[0][1]
    return any(step >= DIVERGENCE_MIN_STEP and accuracy < DIVERGENCE_FRACTION * start for step, accuracy in curve)


def target_reached_or_diverged(target: float):
    def stop(rows: list[dict]) -> bool:
        key = val_accuracy_key(rows)
        if key is None:
            return False
        curve = [(row["step"], row["data"][key]) for row in rows if key in row["data"]]
        return any(step > 0 and accuracy >= target for step, accuracy in curve) or diverged(curve)

    return stop


# An arm needs start-up (~30-60 s) and a few steps to say anything: an arm whose share of the time
# budget is smaller is not run.
MIN_ARM_TIME_S = 120.0
# Time weight of a distillation arm at the first lr of the grid, relative to one at a later lr.
FIRST_LR_EMPHASIS = 3.0


def plan_arms(config: SampleEfficiencyConfig, skip_grpo: bool) -> list[tuple[str, float, float]]:
    """(mode, lr, time weight) in run order: every mode at the first lr of its grid, then GRPO at its
    first lr, then the same for the second lr, and so on.

    Weights: a distillation arm at the first lr of the grid weighs FIRST_LR_EMPHASIS, at a later lr 1
    (a later lr only gets the steps the first one needed, and a mode's number exists once one lr
    reaches the target); every GRPO arm weighs grpo_time_weight (a GRPO step samples rollout.n times
    more, and GRPO's lower bound is set by its shortest arm, so its arms get equal shares)."""
    plan = []
    for position in range(max(len(config.distill_lrs), 0 if skip_grpo else len(config.grpo_lrs))):
        if position < len(config.distill_lrs):
            weight = FIRST_LR_EMPHASIS if position == 0 else 1.0
            plan += [(mode, config.distill_lrs[position], weight) for mode in config.modes]
        if not skip_grpo and position < len(config.grpo_lrs):
            plan.append((GRPO, config.grpo_lrs[position], config.grpo_time_weight))
    return plan


def run_arms(
    assets, config: SampleEfficiencyConfig, val_file: Path, workdir: Path, target: float, skip_grpo: bool, echo
) -> tuple[list[ArmResult], list[dict]]:
    """Run the planned arms: (measured arms, arms not run for lack of time). Within a mode, a later lr is
    capped at the best steps to target so far (it cannot beat it beyond that). With a time budget, each
    arm may use the time left x its weight / the weights of the arms left."""
    plan = plan_arms(config, skip_grpo)
    deadline = time.monotonic() + config.time_budget_s if config.time_budget_s else None
    step_caps: dict[str, int] = {}
    arms, not_run = [], []
    for index, (mode, lr, weight) in enumerate(plan):
        is_grpo = mode == GRPO
        cap = step_caps.get(mode, config.grpo_budget_steps if is_grpo else config.distill_budget_steps)
        time_cap = None
        if deadline is not None:
            time_cap = (deadline - time.monotonic()) * weight / sum(item[2] for item in plan[index:])
            if time_cap < MIN_ARM_TIME_S:
                not_run.append(
                    {"mode": mode, "lr": lr, "reason": f"time budget used up ({time_cap:.0f} s left for it)"}
                )
                echo(f"  [{mode}@lr={lr:g}] not run: time budget used up")
                continue
        samples_per_step = config.batch_size * (config.grpo_samples_per_prompt if is_grpo else 1)
        spec = arm_spec(assets, config, val_file, mode, lr, cap)
        outcome = run_trainer(
            spec, workdir / spec.label, stop_when=target_reached_or_diverged(target), time_cap_s=time_cap, echo=echo
        )
        arm = measure_arm(
            outcome, GRPO if is_grpo else "distillation", mode, lr, cap, samples_per_step, target, time_cap
        )
        arms.append(arm)
        if arm.reached:
            step_caps[mode] = min(cap, arm.steps_to_target)
    return arms, not_run


def best_arm(arms: list[ArmResult]) -> ArmResult | None:
    reached = [arm for arm in arms if arm.reached]
    return min(reached, key=lambda arm: (arm.steps_to_target, arm.train_wall_to_target_s)) if reached else None


def compare(distill_arms: list[ArmResult], grpo_arms: list[ArmResult]) -> dict:
    """Headline keys. Ratios are GRPO / best distillation; when GRPO never reached the target they are
    lower bounds from the least budget any GRPO arm used up (every arm needs more than its own)."""
    best = best_arm(distill_arms)
    grpo_best = best_arm(grpo_arms)
    headline = {
        "steps_to_target_distill": best.steps_to_target if best else None,
        "best_distill_mode": best.mode if best else None,
        "best_distill_lr": best.lr if best else None,
        "samples_to_target_distill": best.samples_to_target if best else None,
        "train_wall_to_target_distill_s": best.train_wall_to_target_s if best else None,
        "steps_to_target_grpo": grpo_best.steps_to_target if grpo_best else None,
        "best_grpo_lr": grpo_best.lr if grpo_best else None,
        "samples_to_target_grpo": grpo_best.samples_to_target if grpo_best else None,
        "train_wall_to_target_grpo_s": grpo_best.train_wall_to_target_s if grpo_best else None,
        "grpo_reached_target": grpo_best is not None,
        "ratios_are_lower_bounds": False,
        "steps_ratio_grpo_over_distill": None,
        "samples_ratio_grpo_over_distill": None,
        "wall_ratio_grpo_over_distill": None,
        "null_reasons": {},
    }
    if best is None:
        reason = "no distillation arm reached the target within its budget"
        for key in (
            "steps_to_target_distill",
            "steps_ratio_grpo_over_distill",
            "samples_ratio_grpo_over_distill",
            "wall_ratio_grpo_over_distill",
        ):
            headline["null_reasons"][key] = reason
        return headline
    if grpo_best is not None:
        grpo_steps, grpo_samples, grpo_wall = (
            grpo_best.steps_to_target,
            grpo_best.samples_to_target,
            grpo_best.train_wall_to_target_s,
        )
    else:
        usable = [arm for arm in grpo_arms if arm.failure is None and not arm.diverged]
        if not usable:
            reason = (
                "GRPO diverged at every lr of its grid"
                if any(arm.diverged for arm in grpo_arms)
                else "GRPO did not run (skipped, failed or no time left)"
            )
            for key in (
                "steps_to_target_grpo",
                "steps_ratio_grpo_over_distill",
                "samples_ratio_grpo_over_distill",
                "wall_ratio_grpo_over_distill",
            ):
                headline["null_reasons"][key] = reason
            return headline
        headline["ratios_are_lower_bounds"] = True
        headline["null_reasons"]["steps_to_target_grpo"] = (
            "GRPO did not reach the target within its budget: "
            + ", ".join(f"not by step {arm.last_validated_step} at lr={arm.lr:g}" for arm in usable)
        )
        grpo_steps = min(arm.last_validated_step for arm in usable)
        grpo_samples = grpo_steps * usable[0].samples_per_step
        grpo_wall = min(arm.train_wall_at_last_validation_s for arm in usable)
        if grpo_steps == 0:
            reason = "GRPO reached no validation after step 0 within its budget: no bound"
            for key in (
                "steps_ratio_grpo_over_distill",
                "samples_ratio_grpo_over_distill",
                "wall_ratio_grpo_over_distill",
            ):
                headline["null_reasons"][key] = reason
            headline["ratios_are_lower_bounds"] = False
            return headline
    headline["steps_ratio_grpo_over_distill"] = ratio(grpo_steps, best.steps_to_target)
    headline["samples_ratio_grpo_over_distill"] = ratio(grpo_samples, best.samples_to_target)
    headline["wall_ratio_grpo_over_distill"] = ratio(grpo_wall, best.train_wall_to_target_s)
    return headline


def arms_table(arms: list[ArmResult], target: float) -> str:
    rows = [
        [
            arm.mode,
            arm.lr,
            arm.budget_steps,
            arm.samples_per_step,
            arm.start_accuracy,
            arm.best_accuracy,
            arm.steps_to_target if arm.reached else f">{arm.last_validated_step}",
            arm.samples_to_target if arm.reached else f">{arm.last_validated_step * arm.samples_per_step}",
            arm.train_wall_to_target_s if arm.reached else f">{arm.train_wall_at_last_validation_s:.1f}",
            arm.median_step_s,
            arm.failure
            or (
                "reached"
                if arm.reached
                else "diverged"
                if arm.diverged
                else "time cap"
                if arm.capped
                else "step budget used up"
            ),
        ]
        for arm in arms
    ]
    headers = [
        "mode",
        "lr",
        "budget",
        "samples/step",
        "acc@0",
        "best acc",
        f"steps to {target:.3g}",
        "samples",
        "train s",
        "s/step",
        "status",
    ]
    return format_table(headers, rows)


def run(
    assets: ToyAssets, config: SampleEfficiencyConfig, workdir: Path, *, skip_grpo: bool = False, echo=print
) -> Part:
    part = Part("sample_efficiency")
    val_file = write_val_subset(assets.val_files, config.val_size, workdir / "val.parquet")
    reference = greedy_accuracies({"teacher": assets.teacher, "student": assets.student}, val_file)
    target = config.target_fraction * reference["teacher"]
    echo(
        f"sample efficiency: teacher {reference['teacher']:.4f}, student {reference['student']:.4f} "
        f"on {val_file.name}; target {target:.4f}"
    )

    arms, not_run = run_arms(assets, config, val_file, workdir, target, skip_grpo, echo)
    distill_arms = [arm for arm in arms if arm.method != GRPO]
    grpo_arms = [arm for arm in arms if arm.method == GRPO]
    if skip_grpo:
        part.notes.append("GRPO skipped (--skip-grpo)")

    part.headline = compare(distill_arms, grpo_arms)
    part.details = {
        "config": asdict(config),
        "teacher_val_accuracy": reference["teacher"],
        "student_val_accuracy": reference["student"],
        "target_accuracy": target,
        "val_rows": _rows(val_file),
        "lr_grid": {"distillation": config.distill_lrs, GRPO: config.grpo_lrs},
        "arms": [asdict(arm) for arm in distill_arms + grpo_arms],
        "arms_not_run": not_run,
    }
    part.commands = [arm.run["command"] for arm in distill_arms + grpo_arms]
    part.tables.append(arms_table(distill_arms + grpo_arms, target))
    return part


def _rows(val_file: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(val_file).num_rows


def float_list(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser, defaults: SampleEfficiencyConfig) -> None:
    add = parser.add_argument
    add("--modes", default=",".join(defaults.modes), help="distillation modes, comma-separated (default: %(default)s)")
    add(
        "--distill-lrs",
        type=float_list,
        default=defaults.distill_lrs,
        help="distillation lr grid, comma-separated, in order (default: 1e-3,3e-4)",
    )
    add(
        "--grpo-lrs",
        type=float_list,
        default=defaults.grpo_lrs,
        help="GRPO lr grid, comma-separated, in order (default: 3e-4,1e-3)",
    )
    add(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="prompts per step, both methods (default: %(default)s)",
    )
    add(
        "--grpo-n",
        type=int,
        default=defaults.grpo_samples_per_prompt,
        help="GRPO completions per prompt (default: %(default)s)",
    )
    add(
        "--distill-budget-steps",
        type=int,
        default=defaults.distill_budget_steps,
        help="step cap per distillation arm (default: %(default)s)",
    )
    add(
        "--grpo-budget-steps",
        type=int,
        default=defaults.grpo_budget_steps,
        help="step cap per GRPO arm (default: %(default)s)",
    )
    add("--eval-every", type=int, default=defaults.eval_every, help="steps between validations (default: %(default)s)")
    add("--val-size", type=int, default=defaults.val_size, help="validation rows, 0 = all 512 (default: %(default)s)")
    add(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear lr warm-up steps (default: %(default)s)"
    )
    add(
        "--target-fraction",
        type=float,
        default=defaults.target_fraction,
        help="of the teacher's accuracy (default: %(default)s)",
    )
    add(
        "--se-minutes",
        type=float,
        default=None,
        help="wall-time budget of all arms together; none: step caps only (default: none)",
    )
    add(
        "--grpo-time-weight",
        type=float,
        default=defaults.grpo_time_weight,
        help="a GRPO arm's share of the time budget relative to a distillation arm's (default: %(default)s)",
    )


def config_from(args: argparse.Namespace) -> SampleEfficiencyConfig:
    return SampleEfficiencyConfig(
        modes=[mode.strip() for mode in args.modes.split(",") if mode.strip()],
        distill_lrs=args.distill_lrs,
        grpo_lrs=args.grpo_lrs,
        batch_size=args.batch_size,
        grpo_samples_per_prompt=args.grpo_n,
        distill_budget_steps=args.distill_budget_steps,
        grpo_budget_steps=args.grpo_budget_steps,
        eval_every=args.eval_every,
        val_size=args.val_size,
        warmup_steps=args.warmup_steps,
        target_fraction=args.target_fraction,
        time_budget_s=args.se_minutes * 60 if args.se_minutes else None,
        grpo_time_weight=args.grpo_time_weight,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, SampleEfficiencyConfig())
    parser.add_argument("--skip-grpo", action="store_true", help="distillation arms only")
    parser.add_argument(
        "--workdir", default="bench/results/tmp/sample_efficiency", help="run folders (default: %(default)s)"
    )
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as error:
        parser.error(str(error))
    part = run(ToyAssets.build(), config, Path(args.workdir).resolve(), skip_grpo=args.skip_grpo)
    part.report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
