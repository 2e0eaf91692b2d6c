"""Model outputs for inference: detached, with autograd on only where forces need it.

Light on purpose (torch only): the ASE calculator imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from forcenet.data.batch import Batch


def predict(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Detached model outputs for one batch; autograd stays on for gradient-force models."""
    needs_grad = bool(getattr(model, "energy_from_gradient", False))
    with torch.set_grad_enabled(needs_grad):
        out = model(batch)
    return {k: v.detach() for k, v in out.items()}


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timing covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
