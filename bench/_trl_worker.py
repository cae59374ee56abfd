"""Train the toy student with TRL's DistillationTrainer; runs inside bench/.venv-trl, started by bench/trl_peer.py.

Imports nothing from verl or verl-distill (they are not installed in TRL's venv): it gets the model folders and
the training parquet on the command line, saves the student as a Hugging Face folder every --save-every steps
and writes a JSON report (per-step seconds, the saved folders with the training wall time at each save, the
loss log, the configuration used). Scoring the saved students is left to trl_peer.py, in the project's venv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl import DistillationConfig, DistillationTrainer


class SaveAndTime(TrainerCallback):
    """Times every optimizer step and saves the student every ``save_every`` steps, saving time excluded."""

    def __init__(self, save_every: int, save_dir: Path):
        self.save_every = save_every
        self.save_dir = save_dir
        self.step_s: list[float] = []
        # CPU seconds of this process per step: less sensitive than wall time to other jobs on a shared machine
        self.step_cpu_s: list[float] = []
        self.train_seconds = 0.0
        self.saves: list[dict] = []
        self.logs: list[dict] = []
        self._mark = self._cpu_mark = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark, self._cpu_mark = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        now, cpu_now = time.perf_counter(), time.process_time()
        # From the end of the previous step (or of its save): data loading, generation, loss, update, logging.
        self.step_s.append(now - self._mark)
        self.step_cpu_s.append(cpu_now - self._cpu_mark)
        self.train_seconds += now - self._mark
        if state.global_step % self.save_every == 0 or state.global_step == state.max_steps:
            folder = self.save_dir / f"step_{state.global_step}"
            model.save_pretrained(folder)
            processing_class.save_pretrained(folder)
            self.saves.append({"step": state.global_step, "wall_s": round(self.train_seconds, 3), "path": str(folder)})
            print(f"step {state.global_step}: saved after {self.train_seconds:.1f}s of training", flush=True)
        self._mark, self._cpu_mark = time.perf_counter(), time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def prompt_dataset(parquet_file: str) -> Dataset:
    """The parquet's chat-message prompts as TRL's conversational ``prompt`` column."""
    frame = pd.read_parquet(parquet_file)
    return Dataset.from_list(
        [{"prompt": [{"role": m["role"], "content": m["content"]} for m in messages]} for messages in frame["prompt"]]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--student", required=True, help="student Hugging Face folder (required)")
    add("--teacher", required=True, help="teacher Hugging Face folder, same tokenizer (required)")
    add("--train-files", required=True, help="training parquet in verl's RLHF layout (required)")
    add("--steps", type=int, required=True, help="optimizer steps (required)")
    add("--save-every", type=int, required=True, help="save the student every N steps and after the last (required)")
    add("--lr", type=float, required=True, help="AdamW learning rate after warm-up (required)")
    add("--lr-warmup-steps", type=int, default=10, help="linear warm-up steps from 0 (default: %(default)s)")
    add("--batch-size", type=int, default=64, help="prompts per step, one completion each (default: %(default)s)")
    add("--max-new-tokens", type=int, default=8, help="completion length limit (default: %(default)s)")
    add("--seed", type=int, default=0, help="seeds prompt order and sampling (default: %(default)s)")
    add("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    add("--out-dir", required=True, help="folder for step_N/ students and worker.json (required)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    config = DistillationConfig(
        output_dir=str(out_dir / "trainer"),
        # the toy recipe: one on-policy batch per step, one update per batch
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=args.lr_warmup_steps,
        weight_decay=0.01,
        max_grad_norm=1.0,
        # beta=1: the divergence is KL(student || teacher) over the full vocabulary
        beta=1.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_completion_length=args.max_new_tokens,
        # fp32 on the CPU like the verl run; TRL's defaults (bf16, gradient checkpointing) only slow a tiny model
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=args.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = SaveAndTime(args.save_every, out_dir)
    trainer = DistillationTrainer(
        model=args.student,
        teacher_model=args.teacher,
        args=config,
        train_dataset=prompt_dataset(args.train_files),
        callbacks=[timer],
    )
    trainer.train()

    report = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "trainer": type(trainer).__name__,
        "step_s": [round(seconds, 5) for seconds in timer.step_s],
        "step_cpu_s": [round(seconds, 5) for seconds in timer.step_cpu_s],
        "train_s": timer.train_seconds,
        "saves": timer.saves,
        "logs": timer.logs,
        "config": {
            key: getattr(config, key)
            for key in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "max_steps",
                "learning_rate",
                "lr_scheduler_type",
                "warmup_steps",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_epsilon",
                "max_grad_norm",
                "beta",
                "temperature",
                "top_k",
                "top_p",
                "max_completion_length",
                "bf16",
                "gradient_checkpointing",
                "seed",
            )
        },
    }
    (out_dir / "worker.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
