"""The toy distillation step as a single-process plain-PyTorch loop: the floor verl's step is compared with.

Same models, prompts, batch, loss and optimizer as ``examples/distillation/run_distillation.sh`` (its
warm-up, not its later cosine decay: a step costs the same at any lr); no verl trainer, no Ray, no FSDP. One step, for a batch of B training prompts x_i:

    y_i ~ pi_theta(. | x_i)                  student samples at temperature 1, at most 8 new tokens, stops at EOS
    KL_{i,t} = sum_v pi_theta(v | x_i, y_i,<t) * (log pi_theta(v | ...) - log nu(v | ...))
                                              exact reverse KL over the whole vocabulary (47 tokens), teacher nu
    loss = (1 / N) * sum_{i, t <= |y_i|} KL_{i,t}
                                              token mean over the batch's N response tokens (EOS included)
    theta <- AdamW(theta, grad loss)          lr warmed up linearly from 0 over 10 steps, weight decay 0.01,
                                              gradient norm clipped to 1.0 (verl's defaults)

The gradient flows through pi_theta's distribution at every visited prefix; the sampled tokens y are
constants, so no policy-gradient term appears (the prefixes are on-policy, the per-position loss is exact).
verl-distill's ``reverse_kl_topk`` with top-k >= the vocabulary is this loss up to its teacher log-prob floor
(-50 nats), far below the toy teacher's lowest log-prob on the student's samples (about -17).

    .venv/bin/python bench/plain_loop.py --batch-size 64 --steps 20 --warmup 3 --lr 1e-3 --out plain.json
    .venv/bin/python bench/plain_loop.py --steps 150 --eval-every 10 --out plain_curve.json

Accuracy is verl-distill's evaluator (``verl.distill.evaluation``: greedy decoding of every validation
prompt, scored by ``verl.distill.toy.reward``), run on the live student; evaluation time is not training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from verl.distill.evaluation import GenerationSettings, LoadedModel, Scorer, evaluate_checkpoint, load_rows
from verl.distill.toy.build import build_toy_assets
from verl.utils import normalize_token_ids

# The toy recipe's settings that the command line does not change.
RESPONSE_LENGTH = 8
TEMPERATURE = 1.0
WEIGHT_DECAY = 0.01
CLIP_GRAD_NORM = 1.0
# Greedy evaluation as in examples/distillation/run_demo.sh.
EVAL_SETTINGS = GenerationSettings(temperature=0.0, max_new_tokens=RESPONSE_LENGTH, batch_size=64, seed=0)


def evaluate_accuracy(model, tokenizer, val_rows) -> float:
    """Greedy validation accuracy by verl-distill's evaluator (scored like any evaluated checkpoint)."""
    was_training = model.training
    model.eval()
    student = LoadedModel(model, tokenizer, [tokenizer.eos_token_id])
    metrics = evaluate_checkpoint(student, None, val_rows, Scorer(), EVAL_SETTINGS, num_examples=0)
    model.train(was_training)
    return metrics["accuracy"]


def first_reaching(curve: list[dict], target: float) -> dict | None:
    """The first point of an accuracy curve at or above ``target``."""
    return next((point for point in curve if point["acc"] >= target), None)


def rendered_prompts(tokenizer, parquet_file: Path) -> list[list[int]]:
    """Token ids of every prompt, rendered with the chat template as verl's RLHFDataset does."""
    frame = pd.read_parquet(parquet_file)
    return [
        normalize_token_ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))
        for messages in frame["prompt"]
    ]


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def response_log_probs(model, sequences, attention_mask, response_width: int) -> torch.Tensor:
    """log-softmax of the next-token logits at each response position, [B, response_width, V]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_width + 1,
    ).logits[:, :-1]
    return torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    assets = build_toy_assets()
    tokenizer = AutoTokenizer.from_pretrained(assets.student)
    student = AutoModelForCausalLM.from_pretrained(assets.student, dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher, dtype=torch.float32).eval().requires_grad_(False)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = GenerationConfig(
        do_sample=True,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        max_new_tokens=RESPONSE_LENGTH,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    # verl's constant schedule with warm-up: the k-th update (from 0) uses lr * min(1, k / warmup).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, k / args.lr_warmup_steps) if args.lr_warmup_steps > 0 else 1.0
    )
    prompts = rendered_prompts(tokenizer, assets.train_files)
    val_rows = load_rows(str(assets.val_files), num_samples=args.val_size) if args.eval_every else []
    order = torch.randperm(len(prompts))
    cursor = 0

    step_s, step_cpu_s, losses, curve = [], [], [], []
    phases = {"gen": [], "teacher": [], "update": []}
    train_seconds = 0.0
    if args.eval_every:
        curve.append({"step": 0, "wall_s": 0.0, "acc": evaluate_accuracy(student, tokenizer, val_rows)})
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):  # a new epoch: reshuffle, drop the incomplete last batch
            order, cursor = torch.randperm(len(prompts)), 0
        batch = [prompts[i] for i in order[cursor : cursor + args.batch_size].tolist()]
        cursor += args.batch_size

        start, cpu_start = time.perf_counter(), time.process_time()
        input_ids, prompt_mask = left_padded(batch, pad_id)
        student.eval()
        with torch.no_grad():
            sequences = student.generate(input_ids=input_ids, attention_mask=prompt_mask, generation_config=sampling)
        student.train()
        responses = sequences[:, input_ids.shape[1] :]
        is_eos = responses == eos_id
        response_mask = (is_eos.cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
        attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
        width = responses.shape[1]
        generated = time.perf_counter()

        with torch.no_grad():
            teacher_log_probs = response_log_probs(teacher, sequences, attention_mask, width)
        scored = time.perf_counter()

        student_log_probs = response_log_probs(student, sequences, attention_mask, width)
        kl = (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum(-1)
        loss = (kl * response_mask).sum() / response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        done = time.perf_counter()

        step_s.append(done - start)
        step_cpu_s.append(time.process_time() - cpu_start)
        phases["gen"].append(generated - start)
        phases["teacher"].append(scored - generated)
        phases["update"].append(done - scored)
        losses.append(loss.item())
        train_seconds += done - start
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            accuracy = evaluate_accuracy(student, tokenizer, val_rows)
            curve.append({"step": step, "wall_s": round(train_seconds, 3), "acc": accuracy})
            print(f"step {step}: loss={loss.item():.4f} acc={accuracy:.4f} train_s={train_seconds:.1f}", flush=True)

    timed = slice(min(args.warmup, len(step_s) - 1), None)  # at least one step is always timed
    result = {
        "system": "plain_pytorch",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps_untimed": args.warmup,
        "median_step_s": statistics.median(step_s[timed]),
        # CPU seconds of this process: less sensitive than wall time to other jobs on a shared machine
        "median_step_cpu_s": statistics.median(step_cpu_s[timed]),
        "step_s": [round(s, 5) for s in step_s],
        "phases": {name: statistics.median(values[timed]) for name, values in phases.items()},
        "loss": [round(value, 6) for value in losses],
        "train_s": train_seconds,
        "config": {
            "lr": args.lr,
            "lr_warmup_steps": args.lr_warmup_steps,
            "weight_decay": WEIGHT_DECAY,
            "clip_grad_norm": CLIP_GRAD_NORM,
            "temperature": TEMPERATURE,
            "response_length": RESPONSE_LENGTH,
            "loss": "exact reverse KL(student || teacher), full vocabulary, token mean",
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "student": str(assets.student),
            "teacher": str(assets.teacher),
        },
    }
    if args.eval_every:
        reached = first_reaching(curve, args.target_acc)
        result.update(
            curve=curve,
            target_acc=args.target_acc,
            val_rows=len(val_rows),
            steps_to_target=reached["step"] if reached else None,
            wall_to_target_s=reached["wall_s"] if reached else None,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--batch-size", type=int, default=64, help="prompts per step, one response each (default: %(default)s)")
    add("--steps", type=int, default=20, help="training steps (default: %(default)s)")
    add(
        "--warmup",
        type=int,
        default=3,
        help="first steps left out of median_step_s and phases (compilation, allocator warm-up) (default: %(default)s)",
    )
    add("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up (default: %(default)s)")
    add(
        "--lr-warmup-steps",
        type=int,
        default=10,
        help="steps of linear learning-rate warm-up from 0, as the toy recipe (default: %(default)s)",
    )
    add(
        "--eval-every",
        type=int,
        default=0,
        help="measure validation accuracy before training, every M steps and after the last; 0: never "
        "(default: %(default)s)",
    )
    add(
        "--target-acc",
        type=float,
        default=0.9,
        help="accuracy for steps_to_target / wall_to_target_s, with --eval-every (default: %(default)s)",
    )
    add(
        "--val-size",
        type=int,
        default=-1,
        help="score the first N validation rows only; -1: all 512 (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="seeds prompt order and sampling (default: %(default)s)")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 as verl's Ray worker actors get (Ray sets OMP_NUM_THREADS=1 in an actor that "
        "requests no CPUs), and two threads on a shared 2-core machine slow down many-fold whenever another job "
        "runs (default: %(default)s)",
    )
    add("--out", required=True, help="JSON file for the results (required)")
    args = parser.parse_args(argv)
    for option in ("batch_size", "steps", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} is {getattr(args, option)}; use a positive integer")
    for option in ("warmup", "lr_warmup_steps", "eval_every"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} is {getattr(args, option)}; use 0 or a positive integer")

    if args.val_size == 0 or args.val_size < -1:
        parser.error(f"--val-size is {args.val_size}; use -1 (all rows) or a positive count")

    result = train(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    phases = " ".join(f"{name}={seconds:.3f}s" for name, seconds in result["phases"].items())
    print(f"plain loop: median step {result['median_step_s']:.3f}s ({phases}); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
