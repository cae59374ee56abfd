"""Build (or reuse) the toy distillation assets: tokenizer, teacher, student and parquet files.

One supervised run of a tiny Qwen2 model on the addition task gives both models: the TEACHER is
its end (greedy validation accuracy >= ``min_teacher_accuracy``), the STUDENT is one of its
snapshots from the middle of its learning transition (accuracy <= ``student_accuracy_fraction``
x the teacher's). Same architecture and tokenizer, so the student differs only in how long it
was trained; measured with ``verl.distill.toy.probe``, on-policy distillation brings such a
student to 90% of the teacher in tens to a few hundred steps depending on the estimator, where a
student from before the transition would first have to escape the plateau.

Layout of ``<cache root>/toy-<hash>/`` (the hash covers FORMAT_VERSION, the seed and the spec)::

    tokenizer/  teacher/  student/      HF folders (student/teacher also hold tokenizer files)
    data/train.parquet  data/val.parquet
    manifest.json                       written last: its presence marks a complete build

Builds are deterministic per machine type: one torch thread, deterministic algorithms and fixed
seeds give byte-identical model and parquet files for the same seed on the same kind of CPU
(recorded as sha256 in the manifest). They are not identical across CPUs: torch picks float kernels
by instruction set (AVX2, AVX-512, NEON, ...), which round differently, and over hundreds of
training steps the teacher and the student snapshot drift apart (seed 0 gave a 1.000 teacher and a
0.299 student on one 2-core machine, 0.996 and 0.326 on another). The data split depends on the
seed only. Claims about the demo are therefore stated as ranges over builds, never for one build.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from verl.distill.toy.cache import build_once, default_cache_root
from verl.distill.toy.generation import greedy_accuracy
from verl.distill.toy.models import ModelSpec, count_parameters, new_model, save_model
from verl.distill.toy.reward import DATA_SOURCE
from verl.distill.toy.supervised import SupervisedTrainer, TeacherSchedule
from verl.distill.toy.task import prompt_ids, split_problems, supervised_batch, write_parquet
from verl.distill.toy.tokenizer import build_tokenizer

# Bump whenever a change to this package changes the built files, so old caches are not reused.
FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"
RELATIVE_PATHS = {
    "tokenizer": "tokenizer",
    "teacher": "teacher",
    "student": "student",
    "train_files": "data/train.parquet",
    "val_files": "data/val.parquet",
}
# Promised to users of the assets: the student starts at no more than half the teacher's accuracy.
_STUDENT_ACCURACY_CEILING = 0.5


@dataclass(frozen=True)
class ToySpec:
    """Everything besides the seed that shapes the assets.

    val_size: validation prompts (the rest of the 8,100 operand pairs are training prompts).
    model: architecture of teacher and student.
    schedule: the supervised run whose end is the teacher.
    snapshot_every: steps between the evaluated snapshots of the run's constant-lr phase
        (student candidates, and the test for the end of the plateau).
    student_accuracy_fraction: the student is the last snapshot before the first one whose
        accuracy exceeds this fraction of the teacher's (the initial random model is snapshot 0).
    min_teacher_accuracy: the build fails when the teacher ends below it (0 disables the check,
        e.g. for shrunken test builds).
    """

    val_size: int = 512
    model: ModelSpec = field(default_factory=ModelSpec)
    schedule: TeacherSchedule = field(default_factory=TeacherSchedule)
    snapshot_every: int = 10
    student_accuracy_fraction: float = 0.45
    min_teacher_accuracy: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.student_accuracy_fraction <= _STUDENT_ACCURACY_CEILING:
            raise ValueError(
                f"student_accuracy_fraction must be in [0, {_STUDENT_ACCURACY_CEILING}], got {self.student_accuracy_fraction}"
            )
        if self.snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {self.snapshot_every}")


@dataclass(frozen=True)
class ToyAssets:
    """Paths and measured values of one complete build (accuracies: greedy, on the val split)."""

    root: Path
    tokenizer: Path
    teacher: Path
    student: Path
    train_files: Path
    val_files: Path
    teacher_accuracy: float
    student_accuracy: float
    seed: int
    build_seconds: float

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    def key_values(self) -> dict[str, str]:
        """What the CLI prints as ``key=value`` lines."""
        return {
            **{key: str(getattr(self, key)) for key in RELATIVE_PATHS},
            "manifest": str(self.manifest),
            "teacher_accuracy": f"{self.teacher_accuracy:.4f}",
            "student_accuracy": f"{self.student_accuracy:.4f}",
        }


def cache_dir_name(spec: ToySpec, seed: int) -> str:
    identity = json.dumps({"format": FORMAT_VERSION, "seed": seed, "spec": asdict(spec)}, sort_keys=True)
    return "toy-" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def build_toy_assets(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
    spec: ToySpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> ToyAssets:
    """The toy assets for ``seed``, built under ``cache_dir`` (default: ``$VERL_DISTILL_CACHE`` or
    ``~/.cache/verl-distill``) unless a complete build is already there (or ``force``).

    ``progress`` receives one line per build phase.
    """
    spec = spec or ToySpec()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final_dir = root.resolve() / cache_dir_name(spec, seed)
    report = progress or (lambda line: None)
    built = build_once(
        final_dir,
        lambda staging: _build(staging, final_dir, spec, seed, report),
        is_complete=_is_complete,
        force=force,
    )
    if not built:
        report(f"reusing complete toy assets in {final_dir}")
    return load_toy_assets(final_dir)


def load_toy_assets(directory: str | Path) -> ToyAssets:
    """The assets of a complete build directory (paths resolved against ``directory``)."""
    directory = Path(directory)
    if not _is_complete(directory):
        raise FileNotFoundError(
            f"{directory} is not a complete toy build (missing or stale {MANIFEST_NAME}); "
            "run `python -m verl.distill.toy build`"
        )
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    return ToyAssets(
        root=directory,
        **{key: directory / relative for key, relative in RELATIVE_PATHS.items()},
        teacher_accuracy=manifest["teacher_accuracy"],
        student_accuracy=manifest["student_accuracy"],
        seed=manifest["seed"],
        build_seconds=manifest["build_seconds"],
    )


def _is_complete(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format") == FORMAT_VERSION and all(
        (directory / relative).is_file() for relative in manifest.get("files", {})
    )


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded global RNG, deterministic kernels and ONE thread (a float reduction split across a
    different number of threads may round differently); the caller's settings are restored."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@dataclass
class _Snapshot:
    step: int
    accuracy: float
    state: dict[str, torch.Tensor]


def _build(staging: Path, final_dir: Path, spec: ToySpec, seed: int, report: Callable[[str], None]) -> None:
    started = time.monotonic()
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(staging / RELATIVE_PATHS["tokenizer"])
    report(f"tokenizer: {len(tokenizer)} tokens, chat template ChatML")

    train, val = split_problems(seed, spec.val_size)
    (staging / "data").mkdir()
    write_parquet(train, "train", staging / RELATIVE_PATHS["train_files"])
    write_parquet(val, "val", staging / RELATIVE_PATHS["val_files"])
    report(f"data: {len(train)} train / {len(val)} val prompts ({DATA_SOURCE})")

    with _deterministic_torch(seed):
        teacher = new_model(spec.model, tokenizer)
        input_ids, labels = supervised_batch(tokenizer, train)
        val_prompts = prompt_ids(tokenizer, val)

        def accuracy(model) -> float:
            return greedy_accuracy(model, tokenizer, val, val_prompts)

        schedule = spec.schedule
        snapshots = [_Snapshot(0, accuracy(teacher), _clone_state(teacher))]

        def snapshot_until_transition(step: int) -> bool:
            if step % spec.snapshot_every:
                return False
            snapshots.append(_Snapshot(step, accuracy(teacher), _clone_state(teacher)))
            return snapshots[-1].accuracy > schedule.transition_accuracy

        trainer = SupervisedTrainer(teacher, input_ids, labels, schedule, torch.Generator().manual_seed(seed))
        train_started = time.monotonic()
        trainer.run(
            schedule.max_constant_steps,
            lambda index: schedule.lr * min(1.0, (index + 1) / schedule.warmup_steps),
            stop=snapshot_until_transition,
        )
        constant_steps = trainer.steps_done
        trainer.run(schedule.decay_steps, lambda index: schedule.lr * (1.0 - index / schedule.decay_steps))
        teacher_accuracy = accuracy(teacher)
        report(
            f"teacher: {constant_steps} constant-lr + {schedule.decay_steps} decay steps in "
            f"{time.monotonic() - train_started:.0f} s, {count_parameters(teacher):,} parameters, "
            f"greedy val accuracy {teacher_accuracy:.3f}"
        )
        if teacher_accuracy < spec.min_teacher_accuracy:
            raise RuntimeError(
                f"the toy teacher reached greedy val accuracy {teacher_accuracy:.3f} < min_teacher_accuracy "
                f"{spec.min_teacher_accuracy} after {trainer.steps_done} steps; raise "
                "ToySpec.schedule.max_constant_steps or decay_steps, or try another seed"
            )
        chosen = _pick_student(snapshots, spec.student_accuracy_fraction * teacher_accuracy)
        student = copy.deepcopy(teacher)
        student.load_state_dict(chosen.state)
        report(f"student: snapshot of step {chosen.step}, greedy val accuracy {chosen.accuracy:.3f}")

    save_model(teacher, tokenizer, staging / RELATIVE_PATHS["teacher"])
    save_model(student, tokenizer, staging / RELATIVE_PATHS["student"])
    files = {
        str(path.relative_to(staging)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(staging.rglob("*"))
        if path.is_file()
    }
    manifest = {
        "format": FORMAT_VERSION,
        "seed": seed,
        "data_source": DATA_SOURCE,
        "paths": {key: str(final_dir / relative) for key, relative in RELATIVE_PATHS.items()},
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": chosen.accuracy,
        "student_snapshot_step": chosen.step,
        "teacher_steps": trainer.steps_done,
        "sizes": {
            "vocab_size": len(tokenizer),
            "teacher_parameters": count_parameters(teacher),
            "student_parameters": count_parameters(student),
            "train_rows": len(train),
            "val_rows": len(val),
            "bytes": sum((staging / relative).stat().st_size for relative in files),
        },
        "spec": asdict(spec),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "build_seconds": round(time.monotonic() - started, 2),
        "files": files,
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    report(f"built in {manifest['build_seconds']:.0f} s")


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _pick_student(snapshots: list[_Snapshot], accuracy_cap: float) -> _Snapshot:
    """The last snapshot before the first one above ``accuracy_cap`` (snapshot 0 if it is above)."""
    chosen = snapshots[0]
    for candidate in snapshots:
        if candidate.accuracy > accuracy_cap:
            break
        chosen = candidate
    return chosen
