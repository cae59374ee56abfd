"""Peer benchmark: Hugging Face TRL's on-policy distillation on the toy task, scored by verl-distill's evaluator.

TRL runs in its own virtualenv (bench/.venv-trl, made by bench/trl_env.sh, run here first; a no-op when the venv
is there) through bench/_trl_worker.py: its ``DistillationTrainer`` (TRL >= 1.x; the successor of GKDTrainer with
lmbda=1, i.e. completions always sampled from the student) with beta=1, which is the exact reverse
KL(student || teacher) over the full vocabulary, token mean over the batch's completion tokens (EOS included) -
the toy recipe's loss. Same student, teacher, training prompts, batch (64 prompts, one completion each),
temperature 1, 8 new tokens, AdamW (lr, 10 warm-up steps from 0, weight decay 0.01), gradient clip 1.0.

The worker saves the student every --eval-every steps with the training wall time so far (saving excluded);
this script, in the project's venv, then scores the initial student and every saved one with the same evaluator
as bench/plain_loop.py and verl runs (greedy, 8 new tokens, exact match on the validation parquet).

    .venv/bin/python bench/trl_peer.py --budget-steps 60 --eval-every 20 --target-acc 0.9 --lr 1e-3 --out trl.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from verl.distill.evaluation import load_rows
from verl.distill.toy.build import build_toy_assets

from plain_loop import evaluate_accuracy, first_reaching

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".venv-trl"
# Each run gets a fresh folder in here, so that concurrent runs never share saved students.
WORK_ROOT = BENCH_DIR / "results" / "tmp"


def ensure_venv(venv: Path) -> float:
    """Create the TRL venv when missing (bench/trl_env.sh); returns the seconds it took."""
    start = time.perf_counter()
    subprocess.run(["bash", str(BENCH_DIR / "trl_env.sh")], check=True, env={**os.environ, "TRL_VENV": str(venv)})
    return time.perf_counter() - start


def run_worker(venv: Path, assets, args: argparse.Namespace, work_dir: Path) -> dict:
    command = [
        str(venv / "bin" / "python"),
        str(BENCH_DIR / "_trl_worker.py"),
        f"--student={assets.student}",
        f"--teacher={assets.teacher}",
        f"--train-files={assets.train_files}",
        f"--steps={args.budget_steps}",
        f"--save-every={args.eval_every}",
        f"--lr={args.lr}",
        f"--batch-size={args.batch_size}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
        f"--out-dir={work_dir}",
    ]
    log_file = work_dir / "worker.log"
    print(f"TRL: {args.budget_steps} steps, saving every {args.eval_every} (log: {log_file})", flush=True)
    with log_file.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"error: the TRL worker failed (exit {finished.returncode}); see {log_file}:\n{tail}")
    return json.loads((work_dir / "worker.json").read_text())


def accuracy_of(folder: Path, val_rows) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return evaluate_accuracy(model, tokenizer, val_rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--budget-steps", type=int, required=True, help="TRL training steps (required)")
    add("--eval-every", type=int, required=True, help="save and score the student every M steps (required)")
    add("--target-acc", type=float, default=0.9, help="accuracy for steps_to_target (default: %(default)s)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up (default: %(default)s)")
    add("--batch-size", type=int, default=64, help="prompts per step (default: %(default)s)")
    add(
        "--warmup",
        type=int,
        default=3,
        help="first steps left out of median_step_s (lazy initialisation) (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="TRL's seed (default: %(default)s)")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of the TRL worker, as bench/plain_loop.py's --threads (default: %(default)s)",
    )
    add(
        "--val-size",
        type=int,
        default=-1,
        help="score the first N validation rows only; -1: all 512 (default: %(default)s)",
    )
    add("--venv", default=str(DEFAULT_VENV), help="TRL's virtualenv, created when missing (default: %(default)s)")
    add(
        "--work-dir",
        default=None,
        help="folder for the saved students and the worker's log and report; must be empty or missing "
        f"(default: a new {WORK_ROOT}/trl_peer-* folder, removed after a successful run)",
    )
    add(
        "--keep-checkpoints",
        action="store_true",
        help="keep the work folder with the saved students (default: the default work folder is removed after "
        "scoring, a given --work-dir keeps only worker.json and worker.log)",
    )
    add("--out", required=True, help="JSON file for the results (required)")
    args = parser.parse_args(argv)
    for option in ("budget_steps", "eval_every", "batch_size", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} is {getattr(args, option)}; use a positive integer")

    if args.warmup < 0:
        parser.error(f"--warmup is {args.warmup}; use 0 or a positive integer")
    if args.val_size == 0 or args.val_size < -1:
        parser.error(f"--val-size is {args.val_size}; use -1 (all rows) or a positive count")

    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        parser.error(f"--work-dir {args.work_dir} is not empty; remove it or name a new folder")

    venv = Path(args.venv)
    setup_s = ensure_venv(venv)
    assets = build_toy_assets()
    if args.work_dir:
        work_dir = Path(args.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        WORK_ROOT.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="trl_peer-", dir=WORK_ROOT))

    worker = run_worker(venv, assets, args, work_dir)

    val_rows = load_rows(str(assets.val_files), num_samples=args.val_size)
    curve = [{"step": 0, "wall_s": 0.0, "acc": accuracy_of(assets.student, val_rows)}]
    for save in worker["saves"]:
        curve.append({"step": save["step"], "wall_s": save["wall_s"], "acc": accuracy_of(Path(save["path"]), val_rows)})
        print(f"step {save['step']}: acc={curve[-1]['acc']:.4f} train_s={save['wall_s']:.1f}", flush=True)
    if not args.keep_checkpoints:
        if args.work_dir:
            for save in worker["saves"]:
                shutil.rmtree(save["path"], ignore_errors=True)
            shutil.rmtree(work_dir / "trainer", ignore_errors=True)
        else:
            shutil.rmtree(work_dir)

    step_s, timed = worker["step_s"], slice(min(args.warmup, len(worker["step_s"]) - 1), None)
    reached = first_reaching(curve, args.target_acc)
    result = {
        "system": "trl",
        "trl_version": worker["trl_version"],
        "trainer": worker["trainer"],
        "batch_size": args.batch_size,
        "budget_steps": args.budget_steps,
        "warmup_steps_untimed": args.warmup,
        "target_acc": args.target_acc,
        "steps_to_target": reached["step"] if reached else None,
        "wall_to_target_s": reached["wall_s"] if reached else None,
        "curve": curve,
        "median_step_s": statistics.median(step_s[timed]),
        "median_step_cpu_s": statistics.median(worker["step_cpu_s"][timed]),
        "step_s": step_s,
        "train_s": worker["train_s"],
        "val_rows": len(val_rows),
        "venv_setup_s": round(setup_s, 3),
        "loss": [entry["loss"] for entry in worker["logs"] if "loss" in entry],
        "config": {
            **worker["config"],
            "transformers_version": worker["transformers_version"],
            "torch_version": worker["torch_version"],
            "torch_threads": worker["torch_threads"],
            "student": str(assets.student),
            "teacher": str(assets.teacher),
            "train_files": str(assets.train_files),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    target = (
        f"reached {args.target_acc} at step {result['steps_to_target']} after {result['wall_to_target_s']:.1f}s"
        if reached
        else f"did not reach {args.target_acc} in {args.budget_steps} steps"
    )
    print(f"TRL {result['trl_version']}: median step {result['median_step_s']:.3f}s; {target}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
