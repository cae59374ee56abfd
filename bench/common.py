"""What every benchmark of bench/ shares: the toy assets, launching ``python -m verl.trainer.main_ppo``
as a user would (own process session, early stop, memory sampling), reading back verl's file-logger
metrics, the machine's description, and printing tables.

A trainer run is started in a process session of its own, so every process it spawns (the driver,
Ray's servers and workers) is found by that session id: to sum their memory, and to kill them all
when the run is stopped early or times out.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

TOY_DATA_SOURCE = "toy_addition"

# The toy task's prompts are ~12 tokens and its answers at most 4 (three digits and EOS).
TOY_PROMPT_LENGTH = 16
TOY_RESPONSE_LENGTH = 8

# A run that neither finishes nor is stopped within this many seconds per step of its budget (plus
# start-up) is killed: a hung Ray worker must not eat the whole benchmark.
RUN_START_UP_ALLOWANCE_S = 300
RUN_SECONDS_PER_STEP_ALLOWANCE = 30

MEMORY_SAMPLE_INTERVAL_S = 0.5
METRICS_POLL_INTERVAL_S = 1.0


# --- toy assets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyAssets:
    """The paths and build-time accuracies printed by ``python -m verl.distill.toy build``."""

    student: str
    teacher: str
    train_files: str
    val_files: str
    teacher_accuracy: float
    student_accuracy: float
    vocab_size: int

    @classmethod
    def build(cls) -> ToyAssets:
        """Build (or reuse from the cache) the toy task's tokenizer, models and data."""
        result = subprocess.run(
            [sys.executable, "-m", "verl.distill.toy", "build"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"python -m verl.distill.toy build failed:\n{result.stderr[-3000:]}")
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        from transformers import AutoTokenizer

        return cls(
            student=values["student"],
            teacher=values["teacher"],
            train_files=values["train_files"],
            val_files=values["val_files"],
            teacher_accuracy=float(values["teacher_accuracy"]),
            student_accuracy=float(values["student_accuracy"]),
            vocab_size=len(AutoTokenizer.from_pretrained(values["tokenizer"])),
        )


def write_val_subset(val_files: str, size: int, path: Path) -> Path:
    """The first ``size`` rows of the toy validation split (its rows are already shuffled), so that
    verl's periodic validation costs less; ``size`` <= 0 keeps them all."""
    import pyarrow.parquet as pq

    table = pq.read_table(val_files)
    if 0 < size < table.num_rows:
        table = table.slice(0, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def greedy_accuracies(model_paths: dict[str, str], val_file: Path) -> dict[str, float]:
    """Greedy accuracy of each model on ``val_file``, computed in this process with the toy task's own
    decoding and scorer (the ones verl's validation uses through the reward manager)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.distill.toy.generation import greedy_accuracy
    from verl.distill.toy.task import Problem

    extra_info = pq.read_table(val_file, columns=["extra_info"]).column("extra_info").to_pylist()
    problems = [Problem(row["a"], row["b"]) for row in extra_info]
    accuracies = {}
    with torch.no_grad():
        for name, path in model_paths.items():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
            accuracies[name] = greedy_accuracy(model, tokenizer, problems)
    return accuracies


def toy_overrides(
    assets: ToyAssets,
    *,
    batch_size: int,
    lr: float,
    val_files: str | Path | None = None,
    samples_per_prompt: int = 1,
    response_length: int = TOY_RESPONSE_LENGTH,
    warmup_steps: int = 0,
    data_seed: int = 1,
) -> list[str]:
    """Hydra overrides shared by every benchmark run: the toy models and data, one optimiser step per
    batch (mini-batch = batch, one micro-batch), a fixed data order (verl's sampler is unseeded
    otherwise), no checkpoints, no activation checkpointing (as the plain loop and TRL run)."""
    completions = batch_size * samples_per_prompt
    return [
        f"actor_rollout_ref.model.path={assets.student}",
        f"data.train_files={assets.train_files}",
        f"data.val_files={val_files or assets.val_files}",
        f"data.train_batch_size={batch_size}",
        f"data.max_prompt_length={TOY_PROMPT_LENGTH}",
        f"data.max_response_length={response_length}",
        f"data.seed={data_seed}",
        f"actor_rollout_ref.rollout.n={samples_per_prompt}",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        f"actor_rollout_ref.actor.optim.lr_warmup_steps={warmup_steps}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch_size}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={completions}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={completions}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={completions}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        "trainer.save_freq=-1",
        "trainer.project_name=bench",
    ]


def toy_scorer_path() -> str:
    """File path of the toy task's scorer, loadable by verl as a custom reward function."""
    import verl.distill.toy.reward

    return verl.distill.toy.reward.__file__


# --- trainer runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerSpec:
    """One ``python -m verl.trainer.main_ppo`` invocation: ``label`` names its working folder."""

    label: str
    config_name: str
    overrides: tuple[str, ...]
    steps: int

    def command(self, workdir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "verl.trainer.main_ppo",
            f"--config-name={self.config_name}",
            *self.overrides,
            f"trainer.total_training_steps={self.steps}",
            f"trainer.experiment_name={self.label}",
            "trainer.logger=[console,file]",
            f"trainer.default_local_dir={workdir / 'checkpoints'}",
            f"hydra.run.dir={workdir / 'hydra'}",
        ]


@dataclass
class RunOutcome:
    """What a trainer run logged and how it ended."""

    label: str
    command: str
    returncode: int | None
    rows: list[dict]
    completed: bool
    stopped_early: bool
    capped: bool
    timed_out: bool
    wall_s: float
    peak_rss_bytes: int | None
    workdir: str
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        """Finished cleanly, or was stopped on purpose (goal met or time cap)."""
        return self.completed or self.stopped_early or self.capped or (self.returncode == 0 and not self.timed_out)

    def failure(self) -> str | None:
        """One line saying why the run is unusable, or None."""
        if self.ok:
            return None
        if self.timed_out:
            return f"{self.label}: timed out after {self.wall_s:.0f} s (logs in {self.workdir})"
        return f"{self.label}: exit {self.returncode} (logs in {self.workdir}): {last_error_line(self.stderr_tail)}"

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(row["step"], float(row["data"][key])) for row in self.rows if key in row["data"]]

    def training_steps(self) -> list[dict]:
        """The metrics of each training step (validation-only rows, like step 0's, left out)."""
        return [row["data"] for row in self.rows if "timing_s/step" in row["data"]]

    def val_curve(self) -> list[tuple[int, float]]:
        key = val_accuracy_key(self.rows)
        return self.series(key) if key else []

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "command": self.command,
            "returncode": self.returncode,
            "completed": self.completed,
            "stopped_early": self.stopped_early,
            "capped": self.capped,
            "timed_out": self.timed_out,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
            "workdir": self.workdir,
            "steps_logged": len(self.training_steps()),
        }


def last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def val_accuracy_key(rows: Iterable[dict]) -> str | None:
    """verl's headline validation metric for the toy task: ``acc`` when the reward manager reports it
    (verl-distill's ``distillation`` manager), else the reward, which the toy scorer makes 1/0 exact match."""
    keys = {key for row in rows for key in row["data"]}
    for variable in ("acc", "reward"):
        for key in sorted(keys):
            if key.startswith(f"val-core/{TOY_DATA_SOURCE}/{variable}/mean@"):
                return key
    return None


def session_processes(session_id: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def kill_session(session_id: int) -> None:
    for process in session_processes(session_id):
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


class MemorySampler(threading.Thread):
    """Peak of the summed RSS of every process of a session, sampled every MEMORY_SAMPLE_INTERVAL_S.

    Summing RSS counts pages shared between processes (torch's libraries, Ray's object store) once per
    process, so it overstates physical use; it is what `ps` shows and is comparable across runs."""

    def __init__(self, session_id: int):
        super().__init__(daemon=True)
        self.session_id = session_id
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(MEMORY_SAMPLE_INTERVAL_S):
            total = 0
            for process in session_processes(self.session_id):
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_bytes


def read_metrics(path: Path) -> list[dict]:
    """verl's file logger writes one JSON object per line, unbuffered; a line being written is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_trainer(
    spec: TrainerSpec,
    workdir: Path,
    *,
    stop_when: Callable[[list[dict]], bool] | None = None,
    time_cap_s: float | None = None,
    sample_memory: bool = False,
    echo: Callable[[str], None] = print,
) -> RunOutcome:
    """Run ``spec`` to its end, or until ``stop_when(metrics rows so far)`` is true, or until
    ``time_cap_s`` seconds after launch (a budget: what was logged counts), or until its time
    allowance runs out (a failure). The whole process session is killed in every case."""
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_file = workdir / "metrics.jsonl"
    metrics_file.unlink(missing_ok=True)
    command = spec.command(workdir)
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics_file), HYDRA_FULL_ERROR="1")
    timeout_s = RUN_START_UP_ALLOWANCE_S + RUN_SECONDS_PER_STEP_ALLOWANCE * spec.steps
    echo(f"  [{spec.label}] up to {spec.steps} steps ...")
    started = time.monotonic()
    with open(workdir / "stdout.log", "w") as stdout, open(workdir / "stderr.log", "w") as stderr:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    sampler = MemorySampler(process.pid) if sample_memory else None
    if sampler:
        sampler.start()
    stopped_early = capped = timed_out = completed = False
    try:
        while process.poll() is None:
            time.sleep(METRICS_POLL_INTERVAL_S)
            rows = read_metrics(metrics_file)
            if any(row["step"] >= spec.steps and "timing_s/step" in row["data"] for row in rows):
                completed = True  # the last step is logged: what is left is Ray's teardown
                break
            if stop_when is not None and stop_when(rows):
                stopped_early = True
                break
            if time_cap_s is not None and time.monotonic() - started > time_cap_s:
                capped = True
                break
            if time.monotonic() - started > timeout_s:
                timed_out = True
                break
    finally:
        kill_session(process.pid)
        process.wait()
        peak = sampler.stop() if sampler else None
    wall_s = time.monotonic() - started
    stderr_text = (workdir / "stderr.log").read_text(errors="replace")
    outcome = RunOutcome(
        label=spec.label,
        command=f"VERL_FILE_LOGGER_PATH={shlex.quote(str(metrics_file))} {shlex.join(command)}",
        returncode=process.returncode,
        rows=read_metrics(metrics_file),
        completed=completed,
        stopped_early=stopped_early,
        capped=capped,
        timed_out=timed_out,
        wall_s=wall_s,
        peak_rss_bytes=peak,
        workdir=str(workdir),
        stderr_tail=stderr_text[-6000:],
    )
    how = (
        "done"
        if completed
        else "stopped early (target reached or diverged)"
        if stopped_early
        else "stopped at its time cap"
        if capped
        else "TIMED OUT"
        if timed_out
        else f"exit {process.returncode}"
    )
    echo(f"  [{spec.label}] {how} after {wall_s:.0f} s, {len(outcome.training_steps())} steps logged")
    return outcome


def run_interleaved_rounds(
    arms: dict[str, TrainerSpec], rounds: int, workdir: Path, part: Part, echo: Callable[[str], None] = print
) -> dict[str, list[RunOutcome]]:
    """Each arm's runs, ``rounds`` of them, launched A B C A B C so that a slow spell of the machine
    falls on every arm; each run's command is added to ``part``."""
    outcomes: dict[str, list[RunOutcome]] = {name: [] for name in arms}
    for round_index in range(rounds):
        for name, spec in arms.items():
            label = f"{spec.label}-round{round_index + 1}"
            outcome = run_trainer(replace(spec, label=label), workdir / label, echo=echo)
            outcomes[name].append(outcome)
            part.commands.append(outcome.command)
    return outcomes


# --- numbers ----------------------------------------------------------------------------------


def median_after_warmup(values: Sequence[float], warmup: int) -> float | None:
    kept = list(values)[warmup:]
    return statistics.median(kept) if kept else None


# verl's timing of a step's phases: rollout (generation, with the reward workers' scoring), the
# student's log-prob recompute, the reference pass (the teacher here), advantages, the actor update,
# and the weight push to the rollout replicas. The step is their sum plus small glue.
STEP_PHASES = ("gen", "old_log_prob", "ref", "adv", "update_actor", "update_weights")


def phase_medians(outcome: RunOutcome | Sequence[RunOutcome], warmup: int) -> dict[str, float | None]:
    """Median seconds of the step and of each phase over the steps after the first ``warmup`` of each
    run, pooled over the runs when given several."""
    outcomes = [outcome] if isinstance(outcome, RunOutcome) else list(outcome)
    return {
        "step": pooled_median(outcomes, "timing_s/step", warmup),
        **{phase: pooled_median(outcomes, f"timing_s/{phase}", warmup) for phase in STEP_PHASES},
    }


def pooled_median(outcomes: Sequence[RunOutcome], key: str, warmup: int) -> float | None:
    """Median of a metric over the steps that log it after the first ``warmup`` of each run, pooled."""
    values = [
        value for run in outcomes for value in [row[key] for row in run.training_steps() if key in row][warmup:]
    ]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def rounded(value, digits: int = 4):
    """Floats rounded for the JSON; non-finite numbers become None (JSON has no NaN)."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


# --- machine ----------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    memory = psutil.virtual_memory()
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(memory.total / 2**30, 1),
        "ram_available_gib_at_start": round(memory.available / 2**30, 1),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "cpu": platform.processor() or platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("verl", "verl-distill", "torch", "transformers", "ray", "trl")},
    }


# --- output -----------------------------------------------------------------------------------


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table: tabulate's when installed (``pip install .[bench]``), else a minimal one."""
    cells = [[format_value(value) for value in row] for row in rows]
    try:
        from tabulate import tabulate
    except ImportError:
        widths = [max(len(str(item)) for item in column) for column in zip(headers, *cells, strict=True)]
        lines = [
            "  ".join(str(item).ljust(width) for item, width in zip(line, widths, strict=True))
            for line in [headers, *cells]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)
    return tabulate(cells, headers=list(headers))


@dataclass
class Part:
    """One benchmark's result: headline keys for summary.json, details, tables to print, commands run."""

    name: str
    headline: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self, out: str) -> None:
        """What a part's script prints and writes when it runs alone (run_all.py merges parts instead)."""
        print(self.tables[0])
        Path(out).write_text(json.dumps(rounded({"headline": self.headline, "details": self.details}), indent=2) + "\n")
