"""The benchmarks of bench/: their bookkeeping on synthetic runs (fast), and a smoke run of
bench/run_all.py with tiny budgets through the real trainer (slow)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

import run_all  # noqa: E402
import sample_efficiency  # noqa: E402
import topk_memory  # noqa: E402
from common import RunOutcome  # noqa: E402

TARGET = 0.9


def outcome(val_by_step: dict[int, float], steps: int, step_s: float = 2.0, **flags) -> RunOutcome:
    """A run that logged ``steps`` training steps of ``step_s`` seconds and validations at the given steps."""
    rows = [{"step": 0, "data": {"val-core/toy_addition/acc/mean@1": val_by_step[0]}}] if 0 in val_by_step else []
    for step in range(1, steps + 1):
        data = {"timing_s/step": step_s}
        if step in val_by_step:
            data["val-core/toy_addition/acc/mean@1"] = val_by_step[step]
        rows.append({"step": step, "data": data})
    return RunOutcome(
        label="arm",
        command="cmd",
        returncode=None,
        rows=rows,
        completed=flags.get("completed", False),
        stopped_early=flags.get("stopped_early", False),
        capped=flags.get("capped", False),
        timed_out=False,
        wall_s=100.0,
        peak_rss_bytes=None,
        workdir="/tmp/arm",
    )


def arm(method, val_by_step, steps, samples_per_step, step_s=2.0, **flags):
    mode = "grpo" if method == "grpo" else "distillation"
    return sample_efficiency.measure_arm(
        outcome(val_by_step, steps, step_s, **flags), method, mode, 1e-3, 100, samples_per_step, TARGET, None
    )


def test_an_arm_reaches_the_target_at_its_first_validation_at_or_above_it():
    result = arm("distillation", {0: 0.3, 10: 0.7, 20: 0.91, 30: 0.95}, steps=30, samples_per_step=64, completed=True)
    assert result.reached and result.steps_to_target == 20
    assert result.samples_to_target == 20 * 64
    assert result.train_wall_to_target_s == pytest.approx(40.0)  # 20 steps x 2 s, validation excluded
    assert result.start_accuracy == 0.3 and result.best_accuracy == 0.95


def test_grpo_short_of_the_target_gives_lower_bounds_from_its_last_validation():
    distill = arm("distillation", {0: 0.3, 10: 0.92}, steps=10, samples_per_step=64, step_s=2.0)
    # 47 steps run, validated last at step 40: GRPO needs more than 40 steps, not more than 47
    grpo = arm("grpo", {0: 0.3, 20: 0.4, 40: 0.5}, steps=47, samples_per_step=256, step_s=8.0, capped=True)
    headline = sample_efficiency.compare([distill], [grpo])
    assert headline["ratios_are_lower_bounds"] is True
    assert (
        headline["steps_to_target_grpo"] is None
        and "not by step 40" in headline["null_reasons"]["steps_to_target_grpo"]
    )
    assert headline["steps_ratio_grpo_over_distill"] == pytest.approx(40 / 10)
    assert headline["samples_ratio_grpo_over_distill"] == pytest.approx(40 * 256 / (10 * 64))
    assert headline["wall_ratio_grpo_over_distill"] == pytest.approx(40 * 8.0 / (10 * 2.0))


def test_grpo_reaching_the_target_gives_exact_ratios_against_the_best_distillation_mode():
    slow = arm("distillation", {0: 0.3, 10: 0.6, 20: 0.9}, steps=20, samples_per_step=64)
    fast = sample_efficiency.measure_arm(
        outcome({0: 0.3, 10: 0.95}, 10), "distillation", "reverse_kl_topk", 1e-3, 100, 64, TARGET, None
    )
    grpo = arm("grpo", {0: 0.3, 30: 0.95}, steps=30, samples_per_step=256, step_s=8.0)
    headline = sample_efficiency.compare([slow, fast], [grpo])
    assert headline["best_distill_mode"] == "reverse_kl_topk" and headline["steps_to_target_distill"] == 10
    assert headline["ratios_are_lower_bounds"] is False
    assert headline["steps_ratio_grpo_over_distill"] == pytest.approx(3.0)
    assert headline["wall_ratio_grpo_over_distill"] == pytest.approx(30 * 8.0 / 20.0)


def test_no_distillation_arm_at_target_makes_every_ratio_null_with_a_reason():
    headline = sample_efficiency.compare([arm("distillation", {0: 0.3, 10: 0.5}, 10, 64)], [])
    for key in ("steps_to_target_distill", "steps_ratio_grpo_over_distill", "wall_ratio_grpo_over_distill"):
        assert headline[key] is None and headline["null_reasons"][key]


def test_the_plan_runs_every_first_lr_before_any_second_and_gives_grpo_arms_equal_larger_shares():
    config = sample_efficiency.SampleEfficiencyConfig(
        modes=["distillation", "opd"], distill_lrs=[1e-3, 3e-4], grpo_lrs=[3e-4, 1e-3], grpo_time_weight=6.0
    )
    first = sample_efficiency.FIRST_LR_EMPHASIS
    assert sample_efficiency.plan_arms(config, skip_grpo=False) == [
        ("distillation", 1e-3, first),
        ("opd", 1e-3, first),
        ("grpo", 3e-4, 6.0),
        ("distillation", 3e-4, 1.0),
        ("opd", 3e-4, 1.0),
        ("grpo", 1e-3, 6.0),
    ]
    assert all(mode != "grpo" for mode, _, _ in sample_efficiency.plan_arms(config, skip_grpo=True))


def test_a_diverged_grpo_arm_is_no_bound_and_all_diverged_gives_null_ratios():
    distill = arm("distillation", {0: 0.3, 10: 0.92}, steps=10, samples_per_step=64)
    collapsed = arm("grpo", {0: 0.3, 10: 0.2, 30: 0.1}, steps=30, samples_per_step=256, stopped_early=True)
    assert collapsed.diverged and not collapsed.reached
    steady = arm("grpo", {0: 0.3, 40: 0.5, 80: 0.6}, steps=80, samples_per_step=256, capped=True)
    headline = sample_efficiency.compare([distill], [collapsed, steady])
    assert headline["steps_ratio_grpo_over_distill"] == pytest.approx(80 / 10)  # not 30 / 10
    headline = sample_efficiency.compare([distill], [collapsed])
    assert headline["steps_ratio_grpo_over_distill"] is None
    assert headline["null_reasons"]["steps_ratio_grpo_over_distill"] == "GRPO diverged at every lr of its grid"


def test_the_stop_rule_fires_at_the_target_or_on_divergence_only():
    stop = sample_efficiency.target_reached_or_diverged(TARGET)
    key = "val-core/toy_addition/acc/mean@1"
    rows = [{"step": 0, "data": {key: 0.3}}, {"step": 10, "data": {key: 0.1}}]
    assert not stop(rows)  # an early dip is not yet divergence
    assert stop(rows + [{"step": 30, "data": {key: 0.1}}])
    assert stop([{"step": 0, "data": {key: 0.3}}, {"step": 20, "data": {key: 0.9}}])
    assert not stop([{"step": 0, "data": {key: 0.95}}])  # the start does not count


def test_accuracy_at_equal_wall_takes_each_curves_last_evaluation_before_the_shorter_end():
    ours = [{"step": 0, "train_wall_s": 0.0, "acc": 0.3}, {"step": 10, "train_wall_s": 20.0, "acc": 0.92}]
    trl = [
        {"step": 0, "wall_s": 0.0, "acc": 0.3},
        {"step": 10, "wall_s": 15.0, "acc": 0.5},
        {"step": 20, "wall_s": 30.0, "acc": 0.93},
    ]
    assert run_all.accuracy_at_equal_wall(ours, trl) == {"wall_s": 20.0, "ours": 0.92, "trl": 0.5}


def test_step_medians_pool_the_rounds_after_each_rounds_warm_up():
    from common import phase_medians

    def timed(seconds: list[float]) -> RunOutcome:
        run = outcome({}, len(seconds))
        for row, value in zip(run.rows, seconds, strict=True):
            row["data"].update({"timing_s/step": value, "timing_s/gen": value / 2})
        return run

    # the slow first step of each round is warm-up; one round alone would give 2.0, the other 4.0
    medians = phase_medians([timed([9.0, 2.0, 2.0, 2.0]), timed([9.0, 4.0, 4.0, 3.0])], warmup=1)
    assert medians["step"] == 2.5 and medians["gen"] == 1.25
    assert medians["ref"] is None  # a phase no round logged
    assert phase_medians(timed([9.0, 2.0, 3.0]), warmup=1)["step"] == 2.5


def test_a_lower_bound_below_a_goal_leaves_the_goal_undecided():
    assert run_all.goal_status("steps_ratio_grpo_over_distill", 2.0, lower_bound=True)["met"] is None
    assert run_all.goal_status("steps_ratio_grpo_over_distill", 5.0, lower_bound=True)["met"] is True
    assert run_all.goal_status("step_time_ratio_distill_over_grpo_kl", 1.2, lower_bound=False)["met"] is False


def _numbers(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.mark.slow
def test_run_all_quick_writes_every_headline_key_finite_or_null_with_a_reason(tmp_path):
    out = tmp_path / "summary.json"
    command = [
        sys.executable, str(BENCH_DIR / "run_all.py"), "--quick",
        # two trainer runs in all (start-up dominates each): step cost's two arms. The sample-efficiency
        # part's arithmetic has the unit tests above
        "--skip-peer", "--skip-scaling", "--skip-overhead", "--skip-sample-efficiency",
        "--workdir", str(tmp_path / "runs"), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())

    for key in run_all.HEADLINE_KEYS:
        assert key in summary, key
        value = summary[key]
        if value is None:
            assert summary["null_reasons"].get(key), f"{key} is null without a reason"
        else:
            assert math.isfinite(value), f"{key}={value}"
    assert summary["machine"]["cores"] >= 1 and summary["machine"]["ram_gib"] > 0
    # the parts that ran measured real steps
    assert summary["step_time_ratio_distill_over_grpo_kl"] is not None
    assert summary["null_reasons"]["wall_to_target_trl_s"].startswith("peer skipped")
    assert summary["null_reasons"]["overhead_ratio_vs_plain_loop"] == "part not run (skipped)"
    assert "sample_efficiency" not in summary["parts"]
    assert summary["null_reasons"]["steps_ratio_grpo_over_distill"] == "part not run (skipped)"
    step_arms = summary["parts"]["step_cost"]["details"]["arms"]
    assert sorted(step_arms) == ["distillation", "grpo_kl"]  # no toy-recipe arm without the overhead part
    for arm in step_arms.values():
        assert arm["failure"] is None and arm["steps_logged"] >= 1 and arm["medians_s"]["step"] > 0
    assert all(math.isfinite(number) for _, number in _numbers(summary))
    commands = [command for part in summary["parts"].values() for command in part["commands"]]
    assert any("verl.trainer.main_ppo" in command for command in commands)


@pytest.mark.slow
def test_overhead_part_reads_the_plain_loops_median_and_divides_our_step_by_it(tmp_path):
    step_part = run_all.Part("step_cost", headline={"median_step_toy_recipe_s": 3.0}, details={"arms": {}})
    args = run_all.build_parser().parse_args(["--completions", "4", "--step-warmup", "1", "--step-steps", "2"])
    part = run_all.overhead_part(step_part, args, tmp_path, echo=lambda message: None)
    plain = part.headline["median_step_plain_loop_s"]
    assert part.details["failure"] is None and plain > 0
    assert part.headline["overhead_ratio_vs_plain_loop"] == pytest.approx(3.0 / plain)
    assert "plain_loop.py" in part.commands[0] and "--batch-size 4" in part.commands[0]


# ------------------------------------------------------------------ topk_memory.py (issue #14 item 5)


def memory_case(code: str, phase: str = "update", vocab: int = 1000, tokens: int = 100):
    return topk_memory.Case(phase, code, vocab, tokens, "float32", 32, 64, topk_memory.BEFORE_REV)


def test_topk_memory_divides_the_extra_peak_by_tokens_and_by_v_times_4_bytes():
    measured = topk_memory.Measurement(
        memory_case("after"), peak_allocated_bytes=800_000, baseline_rss_bytes=10_000, peak_rss_bytes=410_000,
        seconds=1.0,
    )  # fmt: skip
    assert measured.extra_bytes_per_token == 8_000
    assert measured.ratio_to_vocab_float32 == 2.0  # 8000 B per token = 2 x V x 4 B at V = 1000
    assert measured.rss_ratio_to_vocab_float32 == 1.0  # the cross-check is reported, not judged
    before = topk_memory.Measurement(memory_case("before"), 2_000_000, 0, 2_000_000, seconds=1.0)
    over_goal = topk_memory.Measurement(memory_case("after", vocab=500), 500_000, 0, 500_000, seconds=1.0)
    table = topk_memory.table([before, measured, over_goal])
    header, _, *rows = table.splitlines()
    goal_column = [cell.strip() for cell in header.split("  ") if cell.strip()].index("after <= 2")
    cells = [row.split() for row in rows]
    goals = [(row[0], row[1], row[goal_column]) for row in cells]
    assert goals == [("update", "1000", "True"), ("update", "500", "False")]


@pytest.mark.slow
def test_topk_memory_measures_before_and_after_in_fresh_processes(tmp_path):
    out = tmp_path / "topk_memory.json"
    topk_memory.main(["--vocabs", "8192", "--tokens", "512", "--dtypes", "float32", "--out", str(out)])
    summary = json.loads(out.read_text())
    measured = {(m["case"]["phase"], m["case"]["code"]): m for m in summary["measurements"]}
    assert set(measured) == {(phase, code) for phase in ("reference", "update") for code in ("before", "after")}
    for phase in ("reference", "update"):
        # the unchunked code holds several [512, 8192] float32 copies (16 MiB each), the chunked one a few [64, 8192]
        before, after = (measured[phase, code]["ratio_to_vocab_float32"] for code in ("before", "after"))
        assert before > 3 and after < before / 2
    # the update's extra memory includes the logits' gradient: one float32 [rows, V] tensor, ~1 x V x 4 B per token
    assert measured["update", "after"]["ratio_to_vocab_float32"] > 1
    assert summary["goal_met"] is True and "VmHWM" in summary["method"]
