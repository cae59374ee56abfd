"""Every benchmark of issue #7, side by side in one invocation on this machine, into one summary.

    python bench/run_all.py                      full run, about --minutes (60) on a 2-core machine
    python bench/run_all.py --quick --skip-peer  smoke run: tiny budgets, a few minutes, numbers meaningless

Parts, in this order (each prints a table; all land in ``--out``, default bench/results/summary.json):

1. step cost (bench/step_cost.py): median step of distillation vs GRPO with a reference KL, by phase;
2. overhead: bench/plain_loop.py's single-process PyTorch step vs our verl step of the same toy
   recipe (from part 1's ``toy_recipe`` arm);
3. scaling (bench/scaling.py): step time and peak RSS against batch size and response length;
4. peer (bench/trl_peer.py, TRL in its own venv): wall time and steps to the target, accuracy at
   equal wall time, against our ``reverse_kl_topk`` arm (the same loss) at the same learning rate;
5. sample efficiency (bench/sample_efficiency.py): every distillation mode vs GRPO, steps / samples /
   training wall time to 90% of the teacher's accuracy. It runs last and gets the time left of
   ``--minutes`` (at least ``MIN_SAMPLE_EFFICIENCY_SHARE`` of it), shared among its arms.

The summary's top level holds the headline keys of issue #7 (ratios GRPO / distillation, step-time
ratio, wall to target ours vs TRL, overhead ratio), ``goals`` (each goal and whether it is met),
``null_reasons`` (why a headline number is null), ``machine``, and per part its details and the exact
commands it ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sample_efficiency  # noqa: E402
import scaling  # noqa: E402
import step_cost  # noqa: E402
from common import BENCH_DIR, RESULTS_DIR, Part, ToyAssets, format_table, machine_info, ratio, rounded  # noqa: E402

# The sample-efficiency part never gets less than this fraction of --minutes, even when the parts
# before it overran.
MIN_SAMPLE_EFFICIENCY_SHARE = 0.4
# Rough costs on an idle 2-core machine, for the printed plan only: one short trainer run (Ray
# start-up, model set-up, 6-15 steps) and the TRL peer (its default budget and evaluations).
EST_TRAINER_RUN_S = 80
EST_PEER_S = 480

HEADLINE_KEYS = (
    "steps_to_target_distill",
    "steps_to_target_grpo",
    "steps_ratio_grpo_over_distill",
    "samples_ratio_grpo_over_distill",
    "wall_ratio_grpo_over_distill",
    "step_time_ratio_distill_over_grpo_kl",
    "wall_to_target_ours_s",
    "wall_to_target_trl_s",
    "overhead_ratio_vs_plain_loop",
)

# Issue #7's goals: key -> (comparison, threshold)
GOALS = {
    "steps_ratio_grpo_over_distill": (">=", 4.0),
    "samples_ratio_grpo_over_distill": (">=", 10.0),
    "wall_ratio_grpo_over_distill": (">=", 10.0),
    "step_time_ratio_distill_over_grpo_kl": ("<=", 1.05),
    "overhead_ratio_vs_plain_loop": ("<=", 10.0),
    "wall_ratio_trl_over_ours": (">", 1.0),
}


# --- parts that call the other helpers' scripts -------------------------------------------------


def run_script(script: str, arguments: list[str], out: Path, log: Path, echo) -> tuple[dict | None, str, str | None]:
    """Run ``bench/<script>`` in this interpreter; (its JSON output, the command, a failure line or None)."""
    if not (BENCH_DIR / script).exists():
        return None, "", f"bench/{script} is missing"
    command = [sys.executable, str(BENCH_DIR / script), *arguments, "--out", str(out)]
    echo(f"  [{script}] {' '.join(arguments)}")
    out.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        finished = subprocess.run(command, cwd=BENCH_DIR.parent, stdout=handle, stderr=subprocess.STDOUT)
    if finished.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return None, shlex.join(command), f"bench/{script} exit {finished.returncode} (log {log}): {tail[0][:300]}"
    return json.loads(out.read_text()), shlex.join(command), None


def overhead_part(step_part: Part | None, args, workdir: Path, echo) -> Part:
    part = Part("overhead")
    ours = step_part.headline.get("median_step_toy_recipe_s") if step_part else None
    plain, command, failure = run_script(
        "plain_loop.py",
        [
            "--batch-size",
            str(args.completions),
            "--steps",
            str(args.step_warmup + args.step_steps),
            "--warmup",
            str(args.step_warmup),
            "--lr",
            str(step_cost.RECIPE_LR),
        ],
        workdir / "plain_loop.json",
        workdir / "plain_loop.log",
        echo,
    )
    part.commands = [command] if command else []
    plain_median = plain.get("median_step_s") if plain else None
    part.headline = {
        "overhead_ratio_vs_plain_loop": ratio(ours, plain_median),
        "median_step_plain_loop_s": plain_median,
        "median_step_ours_toy_recipe_s": ours,
        "null_reasons": {},
    }
    if part.headline["overhead_ratio_vs_plain_loop"] is None:
        part.headline["null_reasons"]["overhead_ratio_vs_plain_loop"] = failure or (
            "our toy-recipe step was not measured (step cost skipped or failed)"
            if ours is None
            else "plain loop gave no median"
        )
    part.details = {"plain_loop": plain, "failure": failure}
    phases = (plain or {}).get("phases", {})
    recipe = ((step_part.details.get("arms", {}) if step_part else {}).get("toy_recipe") or {}).get("medians_s") or {}
    part.tables.append(
        format_table(
            ["", "step s", "rollout s", "teacher s", "update s"],
            [
                ["plain loop", plain_median, phases.get("gen"), phases.get("teacher"), phases.get("update")],
                ["verl (toy recipe)", ours, recipe.get("gen"), recipe.get("ref"), recipe.get("update_actor")],
                [
                    "verl / plain",
                    part.headline["overhead_ratio_vs_plain_loop"],
                    ratio(recipe.get("gen"), phases.get("gen")),
                    ratio(recipe.get("ref"), phases.get("teacher")),
                    ratio(recipe.get("update_actor"), phases.get("update")),
                ],
            ],
        )
    )
    return part


def peer_part(args, target: float, eval_every: int, workdir: Path, echo) -> Part:
    part = Part("peer")
    trl, command, failure = run_script(
        "trl_peer.py",
        [
            "--budget-steps",
            str(args.trl_budget_steps),
            "--eval-every",
            str(eval_every),
            "--target-acc",
            f"{target:.6g}",
            "--lr",
            str(args.trl_lr),
            # the same validation rows as our runs (our 0 and TRL's -1 both mean all of them)
            "--val-size",
            str(args.val_size or -1),
        ],
        workdir / "trl_peer.json",
        workdir / "trl_peer.log",
        echo,
    )
    part.commands = [command] if command else []
    part.details = {"trl": trl, "failure": failure}
    return part


def finish_peer(part: Part, se_part: Part | None, trl_lr: float) -> None:
    """Our side of the peer comparison: the reverse_kl_topk arm (TRL's loss) at TRL's lr, else the best arm."""
    trl = part.details.get("trl")
    arms = se_part.details.get("arms", []) if se_part else []
    ours = next((arm for arm in arms if arm["mode"] == "reverse_kl_topk" and math.isclose(arm["lr"], trl_lr)), None)
    matched = ours is not None
    if ours is None:
        reached = [arm for arm in arms if arm["method"] == "distillation" and arm["reached"]]
        ours = min(reached, key=lambda arm: arm["steps_to_target"]) if reached else None
    reasons = {}
    ours_wall = ours["train_wall_to_target_s"] if ours else None
    trl_wall = trl.get("wall_to_target_s") if trl else None
    if ours_wall is None:
        reasons["wall_to_target_ours_s"] = (
            "sample efficiency skipped or failed"
            if not arms
            else f"{ours['mode']}@lr={ours['lr']:g} did not reach the target"
            if ours
            else "no distillation arm reached the target"
        )
    if trl_wall is None:
        reasons["wall_to_target_trl_s"] = part.details.get("failure") or (
            "peer skipped (--skip-peer)"
            if trl is None
            else f"TRL did not reach the target in {trl.get('budget_steps')} steps"
        )
    part.headline = {
        "wall_to_target_ours_s": ours_wall,
        "wall_to_target_trl_s": trl_wall,
        "wall_ratio_trl_over_ours": ratio(trl_wall, ours_wall),
        "steps_to_target_ours": ours["steps_to_target"] if ours else None,
        "steps_to_target_trl": trl.get("steps_to_target") if trl else None,
        "ours_arm": f"{ours['mode']}@lr={ours['lr']:g}" if ours else None,
        "ours_arm_matches_trl_loss_and_lr": matched,
        "median_step_trl_s": trl.get("median_step_s") if trl else None,
        "median_step_ours_s": ours["median_step_s"] if ours else None,
        "accuracy_at_equal_wall": accuracy_at_equal_wall(
            ours["curve"] if ours else [], trl.get("curve", []) if trl else []
        ),
        "null_reasons": reasons,
    }
    if part.headline["wall_ratio_trl_over_ours"] is None:
        reasons["wall_ratio_trl_over_ours"] = (
            reasons.get("wall_to_target_trl_s") or reasons.get("wall_to_target_ours_s") or "unknown"
        )
    equal = part.headline["accuracy_at_equal_wall"]
    part.tables.append(
        format_table(
            ["", "steps to target", "train wall to target s", "median step s", f"acc at {format_wall(equal)} s"],
            [
                [
                    f"verl-distill ({part.headline['ours_arm']})",
                    part.headline["steps_to_target_ours"],
                    ours_wall,
                    part.headline["median_step_ours_s"],
                    equal["ours"] if equal else None,
                ],
                [
                    "TRL",
                    part.headline["steps_to_target_trl"],
                    trl_wall,
                    part.headline["median_step_trl_s"],
                    equal["trl"] if equal else None,
                ],
            ],
        )
    )


def format_wall(equal: dict | None) -> str:
    return f"{equal['wall_s']:.0f}" if equal else "-"


def accuracy_at_equal_wall(ours: list[dict], trl: list[dict]) -> dict | None:
    """Both accuracies at the training wall time where the shorter curve ends (each curve's last
    evaluation at or before it): what each system had reached for the same training time."""
    if not ours or not trl:
        return None
    wall = min(ours[-1]["train_wall_s"], trl[-1]["wall_s"])

    def at(curve: list[dict], key: str) -> float:
        return [point["acc"] for point in curve if point[key] <= wall + 1e-9][-1]

    return {"wall_s": wall, "ours": at(ours, "train_wall_s"), "trl": at(trl, "wall_s")}


# --- summary --------------------------------------------------------------------------------------


def goal_status(key: str, value, lower_bound: bool) -> dict:
    comparison, threshold = GOALS[key]
    if value is None:
        met = None
    elif comparison == ">=":
        met = value >= threshold
        if lower_bound and not met:
            met = None  # the true ratio is larger than the bound: unknown
    elif comparison == ">":
        met = value > threshold
    else:
        met = value <= threshold
    return {"goal": f"{comparison} {threshold:g}", "value": value, "met": met, "lower_bound": lower_bound}


def summarize(parts: dict[str, Part], machine: dict, assets: ToyAssets, started: float) -> dict:
    headline, reasons = {}, {}
    for part in parts.values():
        for key, value in part.headline.items():
            if key == "null_reasons":
                reasons.update(value)
            else:
                headline[key] = value
    for key in HEADLINE_KEYS:
        headline.setdefault(key, None)
        if headline[key] is None and key not in reasons:
            reasons[key] = "part not run (skipped)"
    lower = bool(headline.get("ratios_are_lower_bounds"))
    goals = {key: goal_status(key, headline.get(key), lower and key.endswith("grpo_over_distill")) for key in GOALS}
    return rounded(
        {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "invocation": shlex.join([sys.executable, *sys.argv]),
            "total_wall_s": time.monotonic() - started,
            **{key: headline[key] for key in HEADLINE_KEYS},
            "machine": machine,
            "headline": headline,
            "goals": goals,
            "null_reasons": {key: reason for key, reason in reasons.items() if headline.get(key) is None},
            "toy": {
                "student": assets.student,
                "teacher": assets.teacher,
                "train_files": assets.train_files,
                "val_files": assets.val_files,
                "teacher_accuracy_full_val": assets.teacher_accuracy,
                "student_accuracy_full_val": assets.student_accuracy,
            },
            "parts": {
                name: {"details": part.details, "commands": part.commands, "notes": part.notes}
                for name, part in parts.items()
            },
        }
    )


def headline_table(summary: dict) -> str:
    rows = []
    for key in HEADLINE_KEYS:
        goal = summary["goals"].get(key)
        value = summary[key]
        shown = value if value is None or not (goal and goal["lower_bound"]) else f">= {value:.4g}"
        rows.append(
            [
                key,
                shown,
                goal["goal"] if goal else "",
                "" if not goal else {True: "met", False: "NOT met", None: "?"}[goal["met"]],
                summary["null_reasons"].get(key, ""),
            ]
        )
    return format_table(["key", "value", "goal", "", "why null"], rows)


# --- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add = parser.add_argument
    se_defaults = sample_efficiency.SampleEfficiencyConfig()
    add(
        "--minutes",
        type=float,
        default=60.0,
        help="target wall time of the whole run; the sample-efficiency part gets what the others leave "
        "(default: %(default)s)",
    )
    add(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiplies every step budget and --minutes, e.g. 2 for a longer, more conclusive run "
        "(default: %(default)s)",
    )
    add(
        "--quick",
        action="store_true",
        help="smoke-test settings: tiny batches and budgets, one mode, one lr each; the numbers mean nothing",
    )
    add("--skip-peer", action="store_true", help="no TRL run (its keys are null with a reason)")
    add("--skip-scaling", action="store_true", help="no scaling sweep")
    add("--skip-overhead", action="store_true", help="no plain-loop comparison")
    add("--skip-grpo", action="store_true", help="no GRPO arms in the sample-efficiency part")
    add("--skip-sample-efficiency", action="store_true", help="no sample-efficiency part")
    add(
        "--modes",
        default=",".join(sample_efficiency.DISTILLATION_MODES),
        help="distillation modes of the sample-efficiency part (default: all: %(default)s)",
    )
    add(
        "--distill-lrs",
        type=sample_efficiency.float_list,
        default=se_defaults.distill_lrs,
        help="distillation lr grid, in order (default: 1e-3,3e-4)",
    )
    add(
        "--grpo-lrs",
        type=sample_efficiency.float_list,
        default=se_defaults.grpo_lrs,
        help="GRPO lr grid, in order (default: 3e-4,1e-3)",
    )
    add(
        "--batch-size",
        type=int,
        default=se_defaults.batch_size,
        help="prompts per step in the sample-efficiency part (default: %(default)s)",
    )
    add(
        "--grpo-n",
        type=int,
        default=se_defaults.grpo_samples_per_prompt,
        help="GRPO completions per prompt (default: %(default)s)",
    )
    add(
        "--distill-budget-steps",
        type=int,
        default=se_defaults.distill_budget_steps,
        help="step cap per distillation arm, before --budget-scale (default: %(default)s)",
    )
    add(
        "--grpo-budget-steps",
        type=int,
        default=se_defaults.grpo_budget_steps,
        help="step cap per GRPO arm, before --budget-scale; the time budget usually ends it first "
        "(default: %(default)s)",
    )
    add(
        "--grpo-time-weight",
        type=float,
        default=se_defaults.grpo_time_weight,
        help="a GRPO arm's share of the time budget relative to a distillation arm's (default: %(default)s)",
    )
    add(
        "--eval-every",
        type=int,
        default=se_defaults.eval_every,
        help="steps between validations, ours and TRL's (default: %(default)s)",
    )
    add(
        "--val-size",
        type=int,
        default=se_defaults.val_size,
        help="validation rows for our runs, 0 = all 512 (default: %(default)s)",
    )
    add(
        "--completions",
        type=int,
        default=64,
        help="completions per step in the step-cost and overhead parts (default: %(default)s)",
    )
    add("--step-warmup", type=int, default=3, help="steps left out of step-cost medians (default: %(default)s)")
    add(
        "--step-steps",
        type=int,
        default=12,
        help="measured steps per step-cost arm, before --budget-scale (default: %(default)s)",
    )
    add(
        "--step-rounds",
        type=int,
        default=step_cost.StepCostConfig.rounds,
        help="interleaved runs per step-cost arm, pooled (default: %(default)s)",
    )
    add(
        "--scaling-batch-sizes",
        type=scaling.int_list,
        default=[4, 8, 16, 32],
        help="at response length 8 (default: 4,8,16,32)",
    )
    add(
        "--scaling-response-lengths",
        type=scaling.int_list,
        default=[8, 16, 32],
        help="at --scaling-length-batch-size prompts (default: 8,16,32)",
    )
    add(
        "--scaling-length-batch-size",
        type=int,
        default=16,
        help="prompts per step of the response-length sweep (default: %(default)s)",
    )
    add(
        "--trl-budget-steps",
        type=int,
        default=150,
        help="TRL training steps, before --budget-scale (default: %(default)s)",
    )
    add(
        "--trl-lr",
        type=float,
        default=1e-3,
        help="TRL's learning rate; our matching arm is reverse_kl_topk at this lr (default: %(default)s)",
    )
    add("--workdir", default=str(RESULTS_DIR / "tmp"), help="run folders and logs (default: %(default)s)")
    add("--out", default=str(RESULTS_DIR / "summary.json"), help="summary JSON (default: %(default)s)")
    return parser


def apply_quick(args) -> None:
    """Smallest settings that still exercise every part: one distillation mode and one GRPO arm of
    two steps, two measured steps per step-cost arm, one scaling point."""
    args.modes = "distillation"
    args.distill_lrs, args.grpo_lrs = [1e-3], [1e-3]
    args.batch_size, args.completions = 8, 8
    args.distill_budget_steps = args.grpo_budget_steps = 2
    args.eval_every, args.val_size = 1, 16
    args.step_warmup, args.step_steps, args.step_rounds = 1, 2, 1
    args.scaling_batch_sizes, args.scaling_response_lengths, args.scaling_length_batch_size = [4], [8], 4
    args.trl_budget_steps = 2
    args.minutes = None


def scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        apply_quick(args)
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale is {args.budget_scale}; use a positive number")
    started = time.monotonic()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    def echo(message: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[{elapsed / 60:5.1f} min] {message}", flush=True)

    try:
        se_config = sample_efficiency.SampleEfficiencyConfig(
            modes=[mode.strip() for mode in args.modes.split(",") if mode.strip()],
            distill_lrs=args.distill_lrs,
            grpo_lrs=args.grpo_lrs,
            batch_size=args.batch_size,
            grpo_samples_per_prompt=args.grpo_n,
            distill_budget_steps=scaled(args.distill_budget_steps, args.budget_scale),
            grpo_budget_steps=scaled(args.grpo_budget_steps, args.budget_scale),
            eval_every=args.eval_every,
            val_size=args.val_size,
            grpo_time_weight=args.grpo_time_weight,
        )
        sc_config = step_cost.StepCostConfig(
            args.completions,
            args.step_warmup,
            scaled(args.step_steps, args.budget_scale),
            with_recipe=not args.skip_overhead,
            rounds=args.step_rounds,
        )
        scaling_config = scaling.ScalingConfig(
            args.scaling_batch_sizes, args.scaling_response_lengths, args.scaling_length_batch_size
        )
    except ValueError as error:
        parser.error(str(error))
    args.trl_budget_steps = scaled(args.trl_budget_steps, args.budget_scale)
    total_s = args.minutes * 60 * args.budget_scale if args.minutes else None

    machine = machine_info()
    echo(f"machine: {machine['cores']} cores, {machine['ram_gib']} GiB RAM, load {machine['load_average_at_start']}")
    fixed_runs = (2 if args.skip_overhead else 3) * sc_config.rounds + (
        0 if args.skip_scaling else len(scaling_config.points())
    )
    fixed_s = fixed_runs * EST_TRAINER_RUN_S + (0 if args.skip_peer else EST_PEER_S)
    se_s = (
        0
        if args.skip_sample_efficiency
        else max(total_s - fixed_s, MIN_SAMPLE_EFFICIENCY_SHARE * total_s)
        if total_s
        else None
    )
    echo(
        f"plan: {fixed_runs} short trainer runs{'' if args.skip_peer else ' and TRL'} (~{fixed_s / 60:.0f} min), then "
        f"sample efficiency, {len(se_config.modes) * len(se_config.distill_lrs)} distillation + "
        f"{0 if args.skip_grpo else len(se_config.grpo_lrs)} GRPO arms "
        + (
            f"(~{se_s / 60:.0f} min): about {(fixed_s + se_s) / 60:.0f} min in all"
            if se_s is not None
            else "(step caps only)"
        )
    )
    assets = ToyAssets.build()
    parts: dict[str, Part] = {}

    step_part = step_cost.run(assets, sc_config, workdir / "step_cost", echo=echo)
    parts["step_cost"] = step_part
    print(step_part.tables[0], flush=True)

    if not args.skip_overhead:
        parts["overhead"] = overhead_part(step_part, args, workdir, echo)
        print(parts["overhead"].tables[0], flush=True)

    if not args.skip_scaling:
        parts["scaling"] = scaling.run(assets, scaling_config, workdir / "scaling", echo=echo)
        print(parts["scaling"].tables[0], flush=True)

    peer = None
    if not args.skip_peer:
        # The target is the sample-efficiency part's: 0.9 x the teacher's accuracy on the full split.
        peer = peer_part(args, se_config.target_fraction * assets.teacher_accuracy, se_config.eval_every, workdir, echo)
        parts["peer"] = peer

    se_part = None
    if not args.skip_sample_efficiency:
        if total_s:
            left = total_s - (time.monotonic() - started)
            se_config.time_budget_s = max(left, MIN_SAMPLE_EFFICIENCY_SHARE * total_s)
            echo(f"sample efficiency: {se_config.time_budget_s / 60:.1f} min for all arms")
        se_part = sample_efficiency.run(
            assets, se_config, workdir / "sample_efficiency", skip_grpo=args.skip_grpo, echo=echo
        )
        parts["sample_efficiency"] = se_part
        print(se_part.tables[0], flush=True)

    peer = peer or Part("peer", details={"trl": None, "failure": "peer skipped (--skip-peer)"})
    finish_peer(peer, se_part, args.trl_lr)
    parts["peer"] = peer
    print(peer.tables[0], flush=True)

    summary = summarize(parts, machine, assets, started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(headline_table(summary))
    echo(f"summary: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
