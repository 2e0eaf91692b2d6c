"""The learning-rate schedule as one written-out function (no scheduler object).

The multiplier of the base learning rate depends on the optimizer step and on the training
progress in [0, 1], the larger of (steps done / steps in the step budget) and (seconds
trained / wall-clock budget, when one is set). Decay is therefore defined against whichever
budget ends the run, so a time-limited run still anneals to its floor when its time is up.
Because the schedule is a pure function of (step, progress), resuming restores it exactly
from the step counter and the elapsed training time stored in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LrDecay = Literal["cosine", "step", "none"]


def lr_factor(
    step: int,
    progress: float,
    *,
    warmup_steps: int,
    warmup_start: float,
    decay: LrDecay,
    milestones: Sequence[float],
    gamma: float,
    min_factor: float,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    * Warm-up: linear from ``warmup_start`` at step 0 to 1 at ``warmup_steps``.
    * ``"cosine"``: after warm-up, ``min_factor + (1 - min_factor) * (1 + cos(pi p)) / 2``
      with ``p = progress`` (the warm-up is short against the budget, so no re-basing).
    * ``"step"``: times ``gamma`` for each milestone (a fraction of the budget) passed.
    * ``"none"``: constant 1 after warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if decay == "none":
        return 1.0
    if decay == "step":
        return gamma ** sum(progress >= m for m in milestones)
    if decay == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}")


def budget_progress(
    step: int,
    steps_per_epoch: int,
    max_epochs: int,
    elapsed_s: float,
    time_budget_s: float,
    max_steps: int = 0,
) -> float:
    """Fraction of the training budget used: the larger of the step and time fractions.

    The step budget is ``max_steps`` when set (> 0) and shorter than the epoch cap,
    otherwise ``steps_per_epoch * max_epochs``.
    """
    p_steps = step / max(1, total_steps(steps_per_epoch, max_epochs, max_steps))
    p_time = elapsed_s / time_budget_s if time_budget_s > 0 else 0.0
    return min(1.0, max(p_steps, p_time))


def total_steps(steps_per_epoch: int, max_epochs: int, max_steps: int = 0) -> int:
    """Optimizer steps of a run: the step budget ``max_steps`` (0 = none), capped by
    ``max_epochs`` epochs of ``steps_per_epoch``."""
    cap = steps_per_epoch * max_epochs
    return min(cap, max_steps) if max_steps > 0 else cap


@dataclass(frozen=True)
class Schedule:
    """The learning rate of a run against its step: ``lr`` times :func:`lr_factor`."""

    lr: float
    warmup_steps: int
    warmup_start: float
    decay: LrDecay
    milestones: tuple[float, ...]
    gamma: float
    min_factor: float

    def lr_at(self, step: int, progress: float) -> float:
        """The learning rate at optimizer step ``step`` with ``progress`` in [0, 1] of the
        budget used (:func:`budget_progress`)."""
        return self.lr * lr_factor(
            step,
            progress,
            warmup_steps=self.warmup_steps,
            warmup_start=self.warmup_start,
            decay=self.decay,
            milestones=self.milestones,
            gamma=self.gamma,
            min_factor=self.min_factor,
        )
