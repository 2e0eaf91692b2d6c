"""Self-describing checkpoints: save atomically, load without executing code, rebuild the model.

A checkpoint is a plain dict (keys below) written with ``torch.save`` and read back with
``torch.load(..., weights_only=True)`` only, so a checkpoint from elsewhere cannot run
code. ``load_model`` rebuilds the network from the file alone:
``forcenet.models.build_model(ckpt["model_name"], ckpt["model_kwargs"])`` wrapped in
:class:`ScaledModel`, whose buffers (part of ``model_state``) hold the label normalisation,
so the returned module predicts physical units (forces eV/Å, energies eV: referenced as the
training labels were, totals again when per-element reference energies were fitted).

Keys: ``format_version`` (1), ``model_name``, ``model_kwargs`` (plain JSON types),
``model_state`` (state dict of the ScaledModel), ``optimizer_state``, ``scheduler_state``
(``{"step", "base_lr"}``: the schedule is a pure function), ``step`` (optimizer steps done),
``epoch`` (index of the current epoch), ``best_metric`` (best dev ``forces_mae``, eV/Å, or None),
``rng`` (RNG states as tensors), ``params`` (params snapshot), ``graph``
(``{"cutoff", "max_neighbors"}``), ``train_info`` (plain dict: batches done in the current
epoch, elapsed training seconds, normalisation constants with the per-element reference
energies by symbol, history). Checkpoints written before the per-element references
existed load with all of them 0 (what those models were trained with).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from forcenet.atomic import atomic_write
from forcenet.data import keys as K
from forcenet.data.frame import MAX_Z

FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "model_name",
    "model_kwargs",
    "model_state",
    "step",
    "epoch",
    "graph",
)


class CheckpointError(ValueError):
    """A file that is not a readable forcenet checkpoint; the message names the file."""


class ScaledModel(nn.Module):
    """Wraps a model that predicts normalised labels and returns physical units.

    ``forces = force_scale * inner forces`` (eV/Å) and
    ``energy = energy_scale * inner energy + energy_shift + sum_i element_energies[Z_i]``
    (eV, per structure; the per-element reference energies are 0 unless fitted, see
    :func:`forcenet.train_data.label_stats`). For models whose forces are -dE/dpos the two
    scales must be equal so the forces stay the gradient of the energy; the per-element
    term does not depend on positions, so it leaves the forces alone. The constants are
    buffers, so they travel in the state dict.
    """

    force_scale: Tensor  # [] buffer, eV/Å
    energy_scale: Tensor  # [] buffer, eV
    energy_shift: Tensor  # [] buffer, eV
    element_energies: Tensor  # [MAX_Z + 1] float64 buffer, eV per atom of element Z

    def __init__(
        self,
        model: nn.Module,
        *,
        force_scale: float = 1.0,
        energy_scale: float = 1.0,
        energy_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        # the instance's: ForceNet(forces="gradient") is a gradient model, its class is not
        self.energy_from_gradient = bool(getattr(model, "energy_from_gradient", False))
        if self.energy_from_gradient and force_scale != energy_scale:
            raise ValueError("a gradient-force model needs force_scale == energy_scale")
        self.register_buffer("force_scale", torch.tensor(float(force_scale)))
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale)))
        self.register_buffer("energy_shift", torch.tensor(float(energy_shift)))
        self.register_buffer("element_energies", torch.zeros(MAX_Z + 1, dtype=torch.float64))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.model(batch)
        scaled = {K.OUT_FORCES: out[K.OUT_FORCES] * self.force_scale}  # [N, 3] eV/Å
        if K.OUT_ENERGY in out:
            energy = out[K.OUT_ENERGY] * self.energy_scale + self.energy_shift  # [G] eV
            per_atom = self.element_energies[batch[K.ATOMIC_NUMBERS]]  # [N] float64
            reference = torch.zeros(
                energy.shape[0], dtype=per_atom.dtype, device=per_atom.device
            ).index_add_(0, batch[K.BATCH], per_atom)  # [G] float64
            scaled[K.OUT_ENERGY] = energy + reference.to(energy.dtype)
        return scaled

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints from before the per-element references: all 0, as they were trained
        state_dict.setdefault(prefix + "element_energies", torch.zeros_like(self.element_energies))
        super()._load_from_state_dict(state_dict, prefix, *args)


def element_energies(model: ScaledModel) -> dict[str, float]:
    """The wrapper's non-zero per-element reference energies, by element symbol (eV)."""
    from ase.data import chemical_symbols

    values = model.element_energies.tolist()
    return {chemical_symbols[z]: float(e) for z, e in enumerate(values) if e != 0.0}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: refusing to save a checkpoint without keys {missing}")
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename makes it the checkpoint


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a clear error if it is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a torch file...
        raise CheckpointError(f"{path}: not a readable forcenet checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a forcenet checkpoint (top level is not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a forcenet checkpoint (missing keys {missing})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {ckpt['format_version']!r}, "
            f"this forcenet reads {FORMAT_VERSION}"
        )
    return ckpt


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``forcenet.models.build_model`` (imported lazily: models import heavy deps)."""
    from forcenet.models import build_model as _build

    return _build(name, kwargs)


def build_scaled_model(name: str, kwargs: dict[str, Any]) -> ScaledModel:
    """A fresh :class:`ScaledModel` around ``build_model(name, kwargs)`` (unit scales)."""
    return ScaledModel(build_model(name, kwargs))


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of checkpoint ``path`` in eval mode; returns (model, checkpoint).

    The model's ``forward(batch)`` gives physical units: the normalisation constants are
    buffers of the :class:`ScaledModel` restored from ``model_state``.
    """
    ckpt = load_checkpoint(path)
    model = build_scaled_model(ckpt["model_name"], dict(ckpt["model_kwargs"]))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit model {ckpt['model_name']!r}: {exc}"
        ) from exc
    model.to(device).eval()
    return model, ckpt


def rng_state() -> dict[str, Tensor]:
    """Global RNG states as tensors (torch CPU, and every CUDA device when present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Tensor]) -> None:
    """Restore what :func:`rng_state` saved (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"].cpu()))


def training_state(
    model: ScaledModel,
    optimizer: torch.optim.Optimizer,
    *,
    model_name: str,
    model_kwargs: dict[str, Any],
    progress: dict[str, Any],
    params: dict[str, Any],
    graph: dict[str, float | int],
    metrics: dict[str, float],
    base_lr: float,
) -> dict[str, Any]:
    """The checkpoint dict of a training run (see the module docstring for the keys).

    ``progress``: ``{"step", "epoch", "batches_in_epoch", "elapsed_s", "best_metric"}``.
    The sampler and augmentation draws are functions of (seed, epoch, step), so these
    counters plus the global RNG states are all that resuming needs.
    """
    return {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": {"step": int(progress["step"]), "base_lr": float(base_lr)},
        "step": int(progress["step"]),
        "epoch": int(progress["epoch"]),
        "best_metric": progress["best_metric"],
        "rng": rng_state(),
        "params": params,
        "graph": {"cutoff": float(graph["cutoff"]), "max_neighbors": int(graph["max_neighbors"])},
        "train_info": {
            "progress": dict(progress),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "normalizer": {
                "force_scale": float(model.force_scale),
                "energy_scale": float(model.energy_scale),
                "energy_shift": float(model.energy_shift),
                "element_energies": element_energies(model),
            },
        },
    }
