"""Supervised training of a toy model on (prompt, reversed answer + EOS) pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class SupervisedSchedule:
    """AdamW with linear warm-up to ``lr`` then linear decay to 0 at ``steps``.

    Defaults: a hidden-128, 2-layer model reaches ~97% greedy validation accuracy after 300
    steps and ~100% after 400 (measured on 2 CPU cores, one thread, ~0.1 s per step).
    """

    steps: int = 400
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    adam_beta2: float = 0.98
    grad_clip: float = 1.0

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based ``step``."""
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        return warmup * max(0.0, 1.0 - step / self.steps)


def train_supervised(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    schedule: SupervisedSchedule,
    generator: torch.Generator,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Minimise the mean token cross-entropy of ``labels`` (-100 = ignored) on random mini-batches
    of rows drawn with replacement by ``generator``; ``after_step(step)`` runs after each update
    (1-based step)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, schedule.adam_beta2), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    for step in range(1, schedule.steps + 1):
        rows = torch.randint(len(input_ids), (schedule.batch_size,), generator=generator)
        loss = model(input_ids=input_ids[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)
