"""An exponential moving average of the weights (``TrainConfig.ema_decay``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from forcenet.scaling import ScaledModel


class WeightAverage:
    """A copy of the model whose parameters follow the trained ones with ``decay``: after
    every optimizer step ``a <- decay * a + (1 - decay) * w``; buffers (label scales,
    batch-norm statistics) are copied as they are. It is what the dev slice evaluates and
    what the checkpoints hold as the model (the trained weights are kept beside it, so a
    resumed run continues both exactly)."""

    def __init__(self, model: ScaledModel, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: ScaledModel) -> None:
        for avg, w in zip(self.model.parameters(), model.parameters(), strict=True):
            avg.lerp_(w.detach(), 1.0 - self.decay)
        for kept, b in zip(self.model.buffers(), model.buffers(), strict=True):
            kept.copy_(b)

    def converted(self, convert: Callable[[ScaledModel], ScaledModel]) -> WeightAverage:
        """The average of ``convert(model)`` (e.g. the switch to -dE/dx), carried over."""
        new = WeightAverage.__new__(WeightAverage)
        new.decay, new.model = self.decay, convert(self.model).eval()
        new.model.requires_grad_(False)
        return new
