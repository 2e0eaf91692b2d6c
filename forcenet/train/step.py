"""One optimizer step (:func:`train_step`) and the dev metrics (:func:`evaluate`)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from forcenet import distributed as D
from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to
from forcenet.data.online import OnTheFlyGraphs
from forcenet.losses import TrainLoss
from forcenet.metrics import OC20Metrics


class NonFiniteError(FloatingPointError, RuntimeError):
    """A NaN or infinite training loss or dev metric; the message names the step (and the
    metric). A RuntimeError too, so the CLI and the pipeline stages print it as one line."""


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: TrainLoss,
    amp: bool = False,
    clip_grad: float = 0.0,
) -> dict[str, float]:
    """One optimizer step on ``batch`` (already on the model's device); returns diagnostics.

    Under DDP the loss denominators (total atom weight, number of structures) are summed
    over ranks, so the averaged gradient equals that of one global weighted mean.
    ``amp``: bf16 autocast (CUDA only). ``clip_grad`` > 0 clips the global gradient norm.
    A non-finite loss or gradient norm raises :class:`NonFiniteError` before the optimizer
    step, so the weights stay those of the last good step.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = batch[K.POS].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp and device_type == "cuda"):
        out = model(batch)
    terms = loss_fn.terms(out, batch)
    names = sorted(terms)
    local = torch.stack([terms[n].weight.to(torch.float64) for n in names]).to(batch[K.POS].device)
    world = D.dist_info().world_size
    weights = D.all_reduce_sum(local) / world  # DDP averages gradients over ranks
    loss = loss_fn.combine(terms, {n: weights[k].float() for k, n in enumerate(names)})
    if not torch.isfinite(loss):
        raise NonFiniteError(f"non-finite training loss {loss.item()}")
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(grad_norm):  # a finite loss can still have a NaN gradient
        raise NonFiniteError(f"non-finite gradient norm {float(grad_norm)}")
    optimizer.step()
    diag = {"loss": float(loss.detach())}
    for k, n in enumerate(names):
        diag[f"loss_{n}"] = float(terms[n].total.detach()) / max(float(weights[k]) * world, 1e-12)
    diag["grad_norm"] = float(grad_norm)
    return diag


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str,
    graphs: OnTheFlyGraphs | None = None,
) -> dict[str, float]:
    """The OC20 metrics of :class:`forcenet.metrics.OC20Metrics` over ``loader``, exact
    float64 sums over free atoms, summed over ranks (each rank a non-padded shard).

    The dev metrics are thus named as in the evaluation: ``forces_mae`` (eV/Å, the
    selection metric), ``zero_forces_mae``, ``forces_mae_surface``, ``forces_mae_adsorbate``,
    ``zero_forces_mae_surface``, ... (when the data have both tags), ``energy_mae`` (eV)
    when the model has an energy, ``num_free_atoms``, ``num_structures``. ``graphs``:
    builds the batches' edges on ``device`` (on-the-fly graphs; the loader gives frames).
    """
    model.eval()
    needs_grad = bool(getattr(model, "energy_from_gradient", False))
    acc = OC20Metrics()
    for batch in loader:
        batch = batch_to(batch, device)
        if graphs is not None:
            batch = graphs(batch)
        with torch.set_grad_enabled(needs_grad):
            out = model(batch)
        acc.update(out, batch)
    acc.load_state(D.all_reduce_sum(acc.state().to(device)))
    return acc.compute()
