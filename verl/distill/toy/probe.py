"""Plain-PyTorch on-policy distillation on the toy assets: how many steps does an estimator need?

Each step samples one response per prompt from the student (temperature 1), scores the sampled
tokens with student and teacher, and takes one AdamW step on the chosen estimator's loss
(token mean over response tokens up to and including the first EOS). Every ``eval_every`` steps
it measures the student's greedy val accuracy; the result is the first step at which that
reaches ``target_fraction`` x the teacher's accuracy. No verl, no Ray: use it to choose the
demo's estimator and hyper-parameters in seconds, not to train models.

    python -m verl.distill.toy.probe --estimator k3_st --lr 1e-3 --batch-size 64 --steps 150

Estimators (x = log nu(y) - log pi(y) on the sampled token y, pi = student, nu = teacher):
    k3_st       value k3 = e^x - x - 1; gradient of k3 at clamp(x, -c, c) (straight-through clamp).
                Its expected gradient is the forward-KL (teacher cross-entropy) gradient, with the
                importance weight nu/pi capped at e^c.
    k3_verl     verl's low_var_kl: x clamped to [-20, 20], k3 clamped to [-10, 10]; a clamped
                value has zero gradient (k3 > 10 once x > ~2.53).
    k2          value and gradient of k2 = x^2 / 2; its expected gradient is the reverse-KL gradient.
    reverse_kl  exact sum_v pi(v) (log pi(v) - log nu(v)) at every sampled prefix (needs the
                teacher's full distribution, which verl's reference slot does not return).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl.distill.toy.build import ToyAssets, build_toy_assets
from verl.distill.toy.generation import generate, greedy_accuracy
from verl.distill.toy.task import MAX_RESPONSE_TOKENS, Problem, prompt_ids

# Slack past the longest correct answer: a response that does not stop is sampled on, as in a verl
# rollout, and scored as wrong.
_SAMPLED_RESPONSE_TOKENS = MAX_RESPONSE_TOKENS + 2

# (student log-probs [b, t, V], teacher log-probs [b, t, V], sampled ids [b, t], clamp) -> per-token loss [b, t]
Estimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def decorator(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid names: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


def _sampled_log_ratio(student_logp, teacher_logp, tokens) -> torch.Tensor:
    """x = log nu(y) - log pi(y); differentiable through the student only."""
    index = tokens.unsqueeze(-1)
    return (teacher_logp.gather(-1, index) - student_logp.gather(-1, index)).squeeze(-1)


@register_estimator("k3_st")
def k3_straight_through(student_logp, teacher_logp, tokens, clamp):
    x = _sampled_log_ratio(student_logp, teacher_logp, tokens)
    value = torch.exp(x) - x - 1
    slope = torch.expm1(x.clamp(-clamp, clamp))
    return value.detach() + slope.detach() * (x - x.detach())


@register_estimator("k3_verl")
def k3_verl_clamped(student_logp, teacher_logp, tokens, clamp):
    x = _sampled_log_ratio(student_logp, teacher_logp, tokens).clamp(-20.0, 20.0)
    return (torch.exp(x) - x - 1).clamp(-10.0, 10.0)


@register_estimator("k2")
def k2(student_logp, teacher_logp, tokens, clamp):
    return 0.5 * _sampled_log_ratio(student_logp, teacher_logp, tokens) ** 2


@register_estimator("reverse_kl")
def reverse_kl_exact(student_logp, teacher_logp, tokens, clamp):
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


@dataclass(frozen=True)
class ProbeConfig:
    """estimator: a name in ESTIMATORS. clamp: |x| bound of k3_st's gradient.
    lr, warmup_steps, schedule ('constant' | 'cosine', cosine decays to min_lr_ratio x lr at
    ``steps``), weight_decay, grad_clip: AdamW settings as verl's actor optimiser names them.
    batch_size: prompts per step (one sample each). eval_every: steps between greedy val
    evaluations. target_fraction: of the teacher's val accuracy. seed: prompt order and sampling."""

    estimator: str = "k3_st"
    clamp: float = 5.0
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 150
    warmup_steps: int = 10
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 10
    target_fraction: float = 0.9
    seed: int = 0

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based ``step``."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.schedule == "constant":
            return warmup
        if self.schedule == "cosine":
            progress = min(1.0, step / self.steps)
            return warmup * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        raise ValueError(f"unknown schedule {self.schedule!r}; valid names: ['constant', 'cosine']")


@dataclass(frozen=True)
class ProbeResult:
    config: ProbeConfig
    teacher_accuracy: float
    start_accuracy: float
    steps_to_target: int | None
    final_accuracy: float
    best_accuracy: float
    history: list[tuple[int, float]]
    seconds: float


def run_probe(assets: ToyAssets, config: ProbeConfig, report: Callable[[str], None] | None = None) -> ProbeResult:
    """Distil the assets' teacher into (a fresh copy of) their student; see the module docstring."""
    estimator = get_estimator(config.estimator)
    config.lr_factor(0)  # fail on a bad schedule name before any work
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(assets.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher, dtype=torch.float32).eval()
    train = _read_problems(assets.train_files)
    val = _read_problems(assets.val_files)
    train_prompts, val_prompts = prompt_ids(tokenizer, train), prompt_ids(tokenizer, val)
    prompt_len = train_prompts.shape[1]

    teacher_accuracy = greedy_accuracy(teacher, tokenizer, val, val_prompts)
    start_accuracy = greedy_accuracy(student, tokenizer, val, val_prompts)
    target = config.target_fraction * teacher_accuracy
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[tuple[int, float]] = []
    steps_to_target = None
    started = time.monotonic()
    student.train()
    for step in range(1, config.steps + 1):
        prompts = train_prompts[torch.randint(len(train_prompts), (config.batch_size,), generator=generator)]
        responses = generate(
            student, prompts, _SAMPLED_RESPONSE_TOKENS, tokenizer.eos_token_id, tokenizer.pad_token_id, 1.0, generator
        )
        is_eos = (responses == tokenizer.eos_token_id).long()
        mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # up to and including the first EOS
        sequences = torch.cat([prompts, responses], dim=1)
        student_logp = torch.log_softmax(student(sequences).logits[:, prompt_len - 1 : -1].float(), -1)
        with torch.no_grad():
            teacher_logp = torch.log_softmax(teacher(sequences).logits[:, prompt_len - 1 : -1].float(), -1)
        per_token = estimator(student_logp, teacher_logp, responses, config.clamp)
        loss = (per_token * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % config.eval_every == 0 or step == config.steps:
            accuracy = greedy_accuracy(student, tokenizer, val, val_prompts)
            history.append((step, accuracy))
            if steps_to_target is None and accuracy >= target:
                steps_to_target = step
            if report:
                report(f"step {step}: loss {loss.item():.3f} greedy val accuracy {accuracy:.3f} (target {target:.3f})")
    return ProbeResult(
        config=config,
        teacher_accuracy=teacher_accuracy,
        start_accuracy=start_accuracy,
        steps_to_target=steps_to_target,
        final_accuracy=history[-1][1],
        best_accuracy=max(accuracy for _, accuracy in history),
        history=history,
        seconds=round(time.monotonic() - started, 1),
    )


def _read_problems(parquet_path) -> list[Problem]:
    import pyarrow.parquet as pq

    extra = pq.read_table(parquet_path, columns=["extra_info"]).column("extra_info").to_pylist()
    return [Problem(row["a"], row["b"]) for row in extra]


def main(argv: list[str] | None = None) -> int:
    defaults = ProbeConfig()
    parser = argparse.ArgumentParser(prog="python -m verl.distill.toy.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="toy cache root (default: as `python -m verl.distill.toy build`)")
    parser.add_argument("--assets-seed", type=int, default=0, help="seed of the toy build to probe")
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(1)
    assets = build_toy_assets(cache_dir=args.pop("cache_dir"), seed=args.pop("assets_seed"))
    config = ProbeConfig(**args)
    result = run_probe(assets, config, report=lambda line: print(line, flush=True))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
