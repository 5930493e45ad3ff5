"""Learning-rate schedules that know the run's length.

A schedule with ``total_steps=None`` is completed by `RankingModule.configure_optimizers` with
the trainer's estimate of optimiser steps, so one YAML works for any data size or epoch count.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × base lr.

    Stepped once per optimiser step (the module registers it with ``interval: step``).

    Args:
        optimizer: the optimiser whose groups' ``lr`` are the peak rates.
        warmup_steps: steps of linear warm-up.
        total_steps: steps of the whole run (warm-up included); None: filled in by the module.
        min_lr_ratio: the final rate as a fraction of the peak.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the peak rate at optimiser step ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.total_steps or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]
