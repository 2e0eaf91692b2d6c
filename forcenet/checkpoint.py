"""Self-describing checkpoints: save atomically, load without executing code, rebuild the model.

A checkpoint is a plain dict (keys below) written with ``torch.save`` and read back with
``torch.load(..., weights_only=True)`` only, so a checkpoint from elsewhere cannot run
code. ``load_model`` rebuilds the network from the file alone:
``forcenet.models.build_model(ckpt["model_name"], ckpt["model_kwargs"])`` wrapped in
:class:`forcenet.scaling.ScaledModel`, whose buffers (part of ``model_state``) hold the label normalisation,
so the returned module predicts physical units (forces eV/Å, energies eV: referenced as the
training labels were, totals again when per-element reference energies were fitted).

Keys: ``format_version`` (1), ``model_name``, ``model_kwargs`` (plain JSON types),
``model_state`` (state dict of the ScaledModel), ``optimizer_state``, ``scheduler_state``
(``{"step", "base_lr"}``: the schedule is a pure function), ``step`` (optimizer steps done),
``epoch`` (index of the current epoch), ``best_metric`` (best dev ``forces_mae``, eV/Å, or None),
``rng`` (RNG states as tensors), ``params`` (params snapshot), ``graph``
(``{"cutoff", "max_neighbors"}``), ``frame_averaging`` (:data:`forcenet.frames.FrameMode`;
"none" when absent), ``train_info`` (plain dict: batches done in the current
epoch, the dev metrics of the evaluation that wrote it, normalisation constants with the per-element reference
energies by symbol, history), ``run`` (the run's settings: TrainConfig, model kwargs, graph
settings and a fingerprint of the training frames, compared on resume; absent in
checkpoints written before it was kept, which resume with a warning). Checkpoints written before the per-element references
existed load with all of them 0 (what those models were trained with).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from forcenet.atomic import atomic_write
from forcenet.frames import FrameMode
from forcenet.scaling import ScaledModel, element_energies

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


def build_scaled_model(
    name: str, kwargs: dict[str, Any], frame_averaging: FrameMode = "none"
) -> ScaledModel:
    """A fresh :class:`ScaledModel` around ``build_model(name, kwargs)`` (unit scales)."""
    return ScaledModel(build_model(name, kwargs), frame_averaging=frame_averaging)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of checkpoint ``path`` in eval mode; returns (model, checkpoint).

    The model's ``forward(batch)`` gives physical units: the normalisation constants are
    buffers of the :class:`ScaledModel` restored from ``model_state``.
    """
    ckpt = load_checkpoint(path)
    frames = ckpt.get("frame_averaging", "none")  # checkpoints before frame averaging: none
    if frames not in ("none", "stochastic", "full"):
        raise CheckpointError(f"{path}: unknown frame_averaging {frames!r}")
    model = build_scaled_model(ckpt["model_name"], dict(ckpt["model_kwargs"]), frames)
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
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a training run (see the module docstring for the keys).

    ``progress``: ``{"step", "epoch", "batches_in_epoch", "graphs_seen", "best_metric"}``
    (and ``"elapsed_s"`` for a run with a wall-clock cap). No wall-clock figure belongs in
    a checkpoint otherwise: the same state then gives the same bytes.
    The sampler and augmentation draws are functions of (seed, epoch, step), so these
    counters plus the global RNG states are all that resuming needs. ``run``: the run's
    settings (:func:`forcenet.train.state.run_record`), compared when it resumes.
    """
    state = {
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
        "frame_averaging": model.frame_averaging,
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
    if run is not None:
        state["run"] = run
    return state
