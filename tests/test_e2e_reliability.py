"""Reliability on one machine: bad input fails in one line, before Ray starts; a run killed
with SIGKILL resumes from its last complete checkpoint with the same data order; a checkpoint cut
short is never resumed from; two runs at once keep their checkpoints, metrics and toy asset cache apart.

The trainer runs start ``python -m verl.trainer.main_ppo`` in a session of their own, so every
process of a run (driver, Ray's servers and workers) is found, and killed, by that session id
without touching any other run on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_toy_task import TINY_SPEC as TINY_TOY_SPEC  # a build of seconds: a second builder arrives mid-build
from trainer_runs import ray_tmpdir  # noqa: F401  (a fixture)
from trainer_runs import TINY_RUN, TrainerRun, ray_started, run_trainer

from checkpoint_folders import cut_short

from verl.distill.checkpoints import TRACKER_NAME, checkpoint_problem
from verl.distill.toy.build import MANIFEST_NAME, cache_dir_name

pytestmark = pytest.mark.slow

STEPS = 6
SAVE_FREQ = 2
DATA_SEED = 7
RUN_TIMEOUT_S = 600

# --- bad input on the command line ------------------------------------------------------------

TOY_VOCABULARY = 47  # tokens of the toy tokenizer that tiny_assets' models use


def _bad_input_cases():
    """(config name, overrides given the assets and a scratch folder, start of the error after its prefix
    with {train_files} and {scratch} filled in), one per stage that can refuse: before Hydra composes,
    the CPU adaptation, the config alone, data files, the tokenizers, prompt lengths, the vocabulary."""
    return [
        pytest.param(
            "distillation_megatron_trainer",
            lambda assets, scratch: ["actor_rollout_ref.actor.fsdp_config.param_offload=true"],
            "actor_rollout_ref.actor.fsdp_config.param_offload: is an FSDP setting, and "
            "--config-name=distillation_megatron_trainer trains with Megatron; "
            "fix: use actor_rollout_ref.actor.megatron.param_offload",
            id="FSDP key on the Megatron config (Hydra could not compose it)",
        ),
        pytest.param(
            "distillation_megatron_trainer",
            lambda assets, scratch: ["actor_rollout_ref.actor.strategy=fsdp"],
            "actor_rollout_ref.actor.strategy: is 'fsdp', and --config-name=distillation_megatron_trainer",
            id="FSDP strategy on the Megatron config",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: ["actor_rollout_ref.rollout.name=vllm"],
            "actor_rollout_ref.rollout.name=vllm needs a GPU",
            id="GPU rollout on a CPU",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: ["actor_rollout_ref.ref.model.path=null"],
            "actor_rollout_ref.ref.model.path: no teacher",
            id="no teacher",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: ["actor_rollout_ref.actor.kl_loss_type=k1"],
            "actor_rollout_ref.actor.kl_loss_type: 'k1' (k1) as a loss has a gradient that does not depend",
            id="k1 as the loss",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: ["actor_rollout_ref.actor.distill.topk=0"],
            "actor_rollout_ref.actor.distill.topk",
            id="distill option out of range",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: [
                "actor_rollout_ref.rollout.n=4",
                "actor_rollout_ref.actor.distill.select_strategy=best",
            ],
            "actor_rollout_ref.actor.distill.select_strategy: best ranks a prompt's responses by their task "
            "reward, but the distillation reward manager gives every response 0",
            id="best response selection with zero rewards",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: [f"data.train_files={_parquet_without_prompts(scratch)}"],
            "data.train_files ({scratch}/questions.parquet): has no 'prompt' column",
            id="data file without a prompt column",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: [f"actor_rollout_ref.ref.model.path={_model_with_another_tokenizer(scratch)}"],
            "actor_rollout_ref.ref.model.path: the teacher's tokenizer differs from the student's",
            id="teacher with another tokenizer",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: ["data.max_prompt_length=8"],
            "data.train_files ({train_files}): row 0 has a prompt of 14 tokens (chat template applied), "
            "more than data.max_prompt_length=8",
            id="prompt longer than max_prompt_length",
        ),
        pytest.param(
            "distillation_trainer",
            lambda assets, scratch: [
                "actor_rollout_ref.actor.policy_loss.loss_mode=reverse_kl_topk",
                "actor_rollout_ref.actor.distill.topk=1024",
            ],
            f"actor_rollout_ref.actor.distill.topk: is 1024, more than the {TOY_VOCABULARY} tokens",
            id="top-k larger than the vocabulary",
        ),
    ]


def _parquet_without_prompts(folder: Path) -> Path:
    path = folder / "questions.parquet"
    pq.write_table(pa.table({"question": ["1+2="]}), path)
    return path


def _model_with_another_tokenizer(folder: Path) -> Path:
    from test_teacher_slot import TOKENS, save_tiny_model

    return save_tiny_model(folder / "other-tokenizer", tokens=list(reversed(TOKENS)))


@pytest.mark.parametrize(("config_name", "overrides", "expected"), _bad_input_cases())
def test_bad_input_fails_in_one_line_before_ray(tiny_assets, tmp_path, ray_tmpdir, config_name, overrides, expected):
    """Before Ray, structurally: no Ray session was created. How many seconds a refusal takes depends on
    the machine's load; it is measured by bench/bad_input_latency.py (goal: under 15 s)."""
    paths = [
        f"data.train_files={tiny_assets.train_files}",
        f"data.val_files={tiny_assets.val_files}",
        f"actor_rollout_ref.model.path={tiny_assets.student}",
        f"actor_rollout_ref.ref.model.path={tiny_assets.teacher}",
    ]
    arguments = [*paths, *overrides(tiny_assets, tmp_path)]
    run = run_trainer(tmp_path, arguments, config_name=config_name, timeout=300, ray_tmpdir=ray_tmpdir)
    errors = [line for line in run.stderr.splitlines() if line.startswith("verl-distill: error:")]
    assert run.returncode == 2, run.explain()
    expected = expected.format(train_files=tiny_assets.train_files, scratch=tmp_path)
    assert len(errors) == 1 and errors[0].startswith(f"verl-distill: error: {expected}"), run.stderr[-3000:]
    assert "; fix: " in errors[0]
    assert "Traceback" not in run.stderr and "HYDRA_FULL_ERROR" not in run.stderr
    assert "ray init kwargs" not in run.stdout
    assert not ray_started(ray_tmpdir)


# --- trainer runs -----------------------------------------------------------------------------


def _session_processes(session_id: int) -> list[int]:
    """Live (not zombie) processes of a session."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _parent, _group, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == session_id and state != "Z":
            members.append(int(entry.name))
    return members


def _kill_session(session_id: int) -> None:
    for pid in _session_processes(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class LaunchedRun:
    """A ``main_ppo`` run started in its own session, writing everything under ``workdir``."""

    workdir: Path
    name: str
    process: subprocess.Popen | None = None

    @property
    def metrics_file(self) -> Path:
        return self.workdir / f"metrics-{self.name}.jsonl"

    @property
    def rollout_dir(self) -> Path:
        return self.workdir / f"rollouts-{self.name}"

    def log(self, stream: str) -> Path:
        return self.workdir / f"{stream}-{self.name}.log"

    @property
    def checkpoints(self) -> Path:
        return self.workdir / "checkpoints"

    def tracked_step(self) -> int | None:
        try:
            return int((self.checkpoints / TRACKER_NAME).read_text())
        except (OSError, ValueError):
            return None

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> TrainerRun:
        try:
            returncode = self.process.wait(timeout=timeout)
        finally:
            _kill_session(self.process.pid)  # never leave a run behind, even on a failed assertion
        metrics = []
        if self.metrics_file.exists():
            metrics = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
        return TrainerRun(returncode, self.log("stdout").read_text(), self.log("stderr").read_text(), metrics)


def _launch(
    workdir: Path,
    tiny_assets,
    *overrides: str,
    name: str = "run",
    teacher: Path | None = None,
    ray_tmpdir: Path | None = None,
) -> LaunchedRun:
    """Start a distillation run of STEPS steps saving every SAVE_FREQ steps; ``name`` keeps a resumed
    run's metrics and rollout dumps apart from those of the run it resumes. ``teacher`` replaces the
    tiny teacher; ``ray_tmpdir`` is the run's ``RAY_TMPDIR``."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = LaunchedRun(workdir, name)
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-name=distillation_trainer",
        f"data.train_files={tiny_assets.train_files}",
        f"data.val_files={tiny_assets.val_files}",
        f"actor_rollout_ref.model.path={tiny_assets.student}",
        f"actor_rollout_ref.ref.model.path={teacher or tiny_assets.teacher}",
        *TINY_RUN,
        f"data.seed={DATA_SEED}",
        f"trainer.total_training_steps={STEPS}",
        f"trainer.save_freq={SAVE_FREQ}",
        "trainer.logger=[console,file]",
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        f"trainer.rollout_data_dir={run.rollout_dir}",
        f"hydra.run.dir={workdir / 'hydra'}",
        *overrides,
    ]
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(run.metrics_file), HYDRA_FULL_ERROR="0")
    if ray_tmpdir is not None:
        env["RAY_TMPDIR"] = str(ray_tmpdir)
    with open(run.log("stdout"), "w") as stdout, open(run.log("stderr"), "w") as stderr:
        run.process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
    return run


def _dump_written(rollout_dir: Path, step: int) -> bool:
    """verl writes a step's dump line by line in a thread: done once it has as many lines as step 1's."""
    try:
        text = (rollout_dir / f"{step}.jsonl").read_text()
        expected = len((rollout_dir / "1.jsonl").read_text().splitlines())
    except OSError:
        return False
    return text.endswith("\n") and len(text.splitlines()) == expected


def _prompts_by_step(rollout_dir: Path) -> dict[int, list[str]]:
    """The prompts of each step, from verl's ``{step}.jsonl`` rollout dumps (sorted: within a step
    verl orders them by a random uid). A dump a kill cut short is left out."""
    dumps = {int(dump.stem): dump.read_text() for dump in rollout_dir.glob("*.jsonl")}
    return {
        step: sorted(json.loads(line)["input"] for line in text.splitlines())
        for step, text in dumps.items()
        if text.endswith("\n")
    }


def _assert_complete_run(run: TrainerRun, launched: LaunchedRun, steps: range) -> None:
    assert run.returncode == 0, run.explain()
    assert run.steps() == list(steps)
    assert launched.tracked_step() == STEPS
    saved = sorted(int(folder.name.split("_")[-1]) for folder in launched.checkpoints.glob("global_step_*"))
    assert saved == list(range(SAVE_FREQ, STEPS + 1, SAVE_FREQ))
    for step in saved:
        assert checkpoint_problem(launched.checkpoints / f"global_step_{step}") is None


# The kill test's runs are the only end-to-end run of forward_kl_topk (with a tail bucket): a resume
# must also restore a run whose batches carry the teacher's top-k.
FORWARD_KL_TOPK = [
    "actor_rollout_ref.actor.policy_loss.loss_mode=forward_kl_topk",
    "actor_rollout_ref.actor.distill.topk=32",
]


@pytest.fixture(scope="module")
def two_runs_at_once(tiny_assets, tmp_path_factory):
    """Two runs started together on this machine, in different folders: their start-ups (Ray clusters,
    workers, model loading) overlap; their few seconds of training may not. They differ only in the
    teacher: the first has the tiny teacher and is the uninterrupted reference of the kill test; the
    second has the student as its own teacher, validates before training, and has a Ray temp folder
    of its own."""
    root = tmp_path_factory.mktemp("two-runs")
    second_ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Unix socket paths
    launched = [
        _launch(root / "first", tiny_assets),
        _launch(
            root / "second",
            tiny_assets,
            "trainer.val_before_train=true",
            teacher=tiny_assets.student,
            ray_tmpdir=second_ray_tmpdir,
        ),
    ]
    try:
        yield launched, [run.wait() for run in launched], second_ray_tmpdir
    finally:
        for run in launched:
            _kill_session(run.process.pid)
        shutil.rmtree(second_ray_tmpdir, ignore_errors=True)


def test_two_runs_at_once_keep_their_checkpoints_and_metrics_apart(two_runs_at_once):
    (first, second), (first_run, second_run), second_ray_tmpdir = two_runs_at_once
    _assert_complete_run(first_run, first, range(1, STEPS + 1))
    _assert_complete_run(second_run, second, range(0, STEPS + 1))  # step 0: the validation before training
    for launch in (first, second):
        assert sorted(_prompts_by_step(launch.rollout_dir)) == list(range(1, STEPS + 1))
    # Same seed, same data order: what lets the first run serve as the kill test's reference.
    assert _prompts_by_step(first.rollout_dir) == _prompts_by_step(second.rollout_dir)
    # Each run's metrics are its own: a teacher that is the student gives a zero KL, in training and on
    # the untrained student's own validation responses; the tiny teacher does not.
    assert all(value > 0.1 for value in first_run.series("actor/kl_loss"))
    second_kl = second_run.series("actor/kl_loss")
    assert len(second_kl) == STEPS and all(value < 1e-3 for value in second_kl), second_kl
    assert second_run.series("val-core/openai/gsm8k/teacher_kl/mean@1") == [pytest.approx(0.0, abs=1e-3)]
    # the "before Ray" checks of the bad-input tests rely on this trace of a run that did start Ray
    assert ray_started(second_ray_tmpdir)


def test_sigkill_after_a_checkpoint_resumes_with_the_same_data_order(two_runs_at_once, tiny_assets, tmp_path):
    reference = _prompts_by_step(two_runs_at_once[0][0].rollout_dir)  # the loss does not change the data order
    assert reference[1] != reference[1 + SAVE_FREQ], "restarting the data from scratch would go unnoticed"

    killed = _launch(tmp_path, tiny_assets, *FORWARD_KL_TOPK)
    try:
        # Kill once a checkpoint is committed and the next step has produced its rollouts.
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            tracked = killed.tracked_step()
            if tracked is not None and _dump_written(killed.rollout_dir, tracked + 1):
                break
            assert killed.process.poll() is None, killed.wait().explain()
            assert time.monotonic() < deadline, "no checkpoint before the timeout"
            time.sleep(0.05)
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed.process.wait()
        # Ray's workers lead process groups of their own; they must follow their raylet.
        deadline = time.monotonic() + 30
        while _session_processes(killed.process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = _session_processes(killed.process.pid)
        assert leftovers == [], f"processes of the killed run survived: {leftovers}"
    finally:
        _kill_session(killed.process.pid)

    resumed_from = killed.tracked_step()
    assert resumed_from is not None and resumed_from < STEPS, "the kill came too late to test a resume"
    lost_step = resumed_from + 1
    before_kill = _prompts_by_step(killed.rollout_dir)
    assert all(before_kill[step] == reference[step] for step in before_kill)
    # A later save cut short by a kill: weights half-written, no data.pt, tracker unchanged.
    half_written = killed.checkpoints / f"global_step_{resumed_from + SAVE_FREQ}"
    shutil.copytree(killed.checkpoints / f"global_step_{resumed_from}" / "actor", half_written / "actor")
    cut_short(half_written / "actor" / "model_world_size_1_rank_0.pt")

    launched = _launch(tmp_path, tiny_assets, *FORWARD_KL_TOPK, "trainer.resume_mode=auto", name="resumed")
    resumed = launched.wait()
    _assert_complete_run(resumed, launched, range(lost_step, STEPS + 1))
    # forward KL over the teacher's top-k, which holds a share of the sampled tokens; no policy gradient
    resumed_steps = STEPS + 1 - lost_step
    assert resumed.series("actor/distillation_mode") == [1.0] * resumed_steps
    assert resumed.series("actor/pg_loss") == [0.0] * resumed_steps
    assert all(value > 0 for value in resumed.series("actor/kl_loss"))
    coverage = resumed.series("actor/teacher_topk_coverage")
    assert len(coverage) == resumed_steps and all(0 < value <= 1 for value in coverage), coverage
    after_resume = _prompts_by_step(launched.rollout_dir)
    assert sorted(after_resume) == list(range(lost_step, STEPS + 1))
    assert all(after_resume[step] == reference[step] for step in after_resume)


# --- the toy asset cache ----------------------------------------------------------------------

_TOY_BUILDER = textwrap.dedent(
    """
    import json, pickle, sys, time
    from pathlib import Path
    from verl.distill.toy import build_toy_assets

    cache_dir, spec_file, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    spec = pickle.loads(spec_file.read_bytes())
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    lines = []
    started = time.monotonic()
    assets = build_toy_assets(cache_dir=cache_dir, spec=spec, progress=lines.append)
    print(json.dumps({"root": str(assets.root), "lines": lines, "started": started, "ended": time.monotonic()}))
    """
)


def test_two_processes_building_the_toy_cache_at_once_build_it_once(tmp_path):
    cache = tmp_path / "cache"
    final = cache / cache_dir_name(TINY_TOY_SPEC, 0)
    # Leftovers of a builder killed earlier: its staging folder, and a final folder without manifest.
    (cache / f".{final.name}.tmp-killed").mkdir(parents=True)
    (final / "teacher").mkdir(parents=True)
    (final / "teacher" / "half-written.safetensors").write_bytes(b"\0" * 64)
    spec_file = tmp_path / "spec.pickle"
    spec_file.write_bytes(pickle.dumps(TINY_TOY_SPEC))
    script = tmp_path / "build_toy.py"
    script.write_text(_TOY_BUILDER)
    ready = [tmp_path / f"ready-{index}" for index in range(2)]
    go = tmp_path / "go"
    builders = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), str(spec_file), str(flag), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(flag.exists() for flag in ready):  # both imported: start the builds together
            assert all(builder.poll() is None for builder in builders), "a builder died while importing"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        go.touch()
        results = []
        for builder in builders:
            stdout, stderr = builder.communicate(timeout=300)
            assert builder.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for builder in builders:
            builder.kill()

    assert [Path(result["root"]) for result in results] == [final, final]
    built = [result for result in results if not any(line.startswith("reusing") for line in result["lines"])]
    assert len(built) == 1, [result["lines"] for result in results]
    reused = next(result for result in results if result is not built[0])
    assert reused["started"] < built[0]["ended"], "the second builder arrived after the build: nothing was tested"
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    written = {str(file.relative_to(final)): file for file in final.rglob("*") if file.is_file()}
    assert sorted(written) == sorted([*manifest["files"], MANIFEST_NAME])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(written[name].read_bytes()).hexdigest() == digest, name
    assert sorted(entry.name for entry in cache.iterdir()) == [final.name, f"{final.name}.lock"]
