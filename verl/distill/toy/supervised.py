"""Supervised training of a toy model on (prompt, reversed answer + EOS) pairs.

Tiny transformers learn this task in a sudden transition after a plateau whose length varies a
lot with the seed (measured: 100 to 400+ steps at lr 3e-3, batch 128). A fixed schedule is
therefore either wasteful or fails for some seeds; the teacher's run instead has two phases:
a constant learning rate until validation accuracy shows the transition, then a linear decay to
zero that polishes the model to ~100%.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class TeacherSchedule:
    """AdamW (no weight decay) on mini-batches drawn with replacement.

    lr: peak learning rate, reached linearly over ``warmup_steps`` and then held.
    transition_accuracy: the constant phase ends at the first snapshot above this greedy val
        accuracy, or after ``max_constant_steps``.
    decay_steps: length of the final linear decay of the learning rate to 0.
    """

    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    max_constant_steps: int = 1500
    transition_accuracy: float = 0.5
    decay_steps: int = 150
    adam_beta2: float = 0.98
    grad_clip: float = 1.0


class SupervisedTrainer:
    """Minimises the mean token cross-entropy of ``labels`` (-100 = ignored) for ``model``; the
    optimiser state carries over between ``run`` calls."""

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        schedule: TeacherSchedule,
        generator: torch.Generator,
    ):
        self.model = model
        self.input_ids = input_ids
        self.labels = labels
        self.schedule = schedule
        self.generator = generator
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=schedule.lr, betas=(0.9, schedule.adam_beta2), weight_decay=0.0
        )
        self.steps_done = 0

    def run(self, steps: int, lr_at: Callable[[int], float], stop: Callable[[int], bool] | None = None) -> None:
        """Up to ``steps`` updates, the i-th (0-based) at learning rate ``lr_at(i)``; after each,
        ``stop(total steps done)`` may end the run early."""
        self.model.train()
        for index in range(steps):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(index)
            rows = torch.randint(len(self.input_ids), (self.schedule.batch_size,), generator=self.generator)
            loss = self.model(input_ids=self.input_ids[rows], labels=self.labels[rows]).loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.schedule.grad_clip)
            self.optimizer.step()
            self.steps_done += 1
            if stop is not None and stop(self.steps_done):
                return
