"""Self-describing checkpoints: save atomically, load without executing code, rebuild the model.

A checkpoint is a plain dict (keys below) written with ``torch.save`` and read back with
``torch.load(..., weights_only=True)`` only, so a checkpoint from elsewhere cannot run
code. ``load_model`` rebuilds the network from the file alone:
``forcenet.models.build_model(ckpt["model_name"], ckpt["model_kwargs"])`` wrapped in
:class:`forcenet.scaling.ScaledModel`, whose buffers (part of ``model_state``) hold the
label normalisation, so the returned module predicts physical units (forces eV/Å, energies
eV: referenced as the training labels were, totals again when per-element reference energies
were fitted).

Keys: ``format_version`` (1), ``model_name``, ``model_kwargs`` (plain JSON types),
``model_state`` (state dict of the ScaledModel), ``optimizer_state``, ``scheduler_state``
(``{"step", "base_lr"}``: the schedule is a pure function), ``step`` (optimizer steps done),
``epoch`` (index of the current epoch), ``best_metric`` (best dev ``forces_mae``, eV/Å, or None),
``rng`` (RNG states as tensors), ``params`` (params snapshot), ``graph``
(``{"cutoff", "max_neighbors"}``), ``frame_averaging`` (:data:`forcenet.frames.FrameMode`;
"none" when absent), ``train_info`` (plain dict: batches done in the current epoch, the dev
metrics of the evaluation that wrote it, normalisation constants with the per-element
reference energies by symbol, history), ``run`` (the run's settings: TrainConfig, model
kwargs, graph settings and a fingerprint of the training frames, compared on resume; absent
in checkpoints written before it was kept, which resume with a warning), and ``checksum``
(``"sha256:<hex>"``, see :func:`state_checksum`): written by :func:`save_checkpoint`,
verified by :func:`load_checkpoint`, so a damaged file is refused instead of evaluating to
NaN. Checkpoints written before the per-element references existed load with all of them 0
(what those models were trained with). Checkpoints written before the checksum are refused
with instructions: ``forcenet checkpoint-resave FILE`` adds one to a file you trust.
"""

from __future__ import annotations

import errno
import hashlib
import json
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


#: The key of the checksum that :func:`save_checkpoint` adds and :func:`load_checkpoint` checks.
CHECKSUM_KEY = "checksum"
_CHECKSUM_PREFIX = "sha256:"


def state_checksum(state: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of a checkpoint dict, its ``checksum`` key left out.

    Every tensor contributes its dtype, shape and raw bytes; every other value its
    canonical JSON; dicts are walked in sorted key order, so the checksum depends on the
    content only (not on insertion order, device or memory layout).
    """
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return _CHECKSUM_PREFIX + digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    """Feed ``obj`` into ``digest`` with a type tag per value, so that e.g. the list
    ``[1, 2]`` and the string ``"[1, 2]"`` cannot hash alike."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        head = json.dumps([str(t.dtype), list(t.shape)])
        digest.update(b"T" + head.encode() + b"\0")
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(b"D%d\0" % len(obj))
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, list | tuple):
        digest.update(b"%s%d\0" % (b"L" if isinstance(obj, list) else b"U", len(obj)))
        for item in obj:
            _feed(digest, item)
    elif obj is None or isinstance(obj, bool | int | float | str):
        digest.update(b"S" + json.dumps(obj).encode() + b"\0")
    else:  # torch.dtype, torch.device and the like: their type and repr are canonical
        digest.update(b"O" + f"{type(obj).__qualname__}:{obj!r}".encode() + b"\0")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with its checksum to ``path`` atomically (temporary file in the
    same folder + rename). A full disk or another failed write raises a
    :class:`CheckpointError` naming ``path`` and leaves no temporary file; the previous
    checkpoint (if any) stays in place. ``state`` itself is not modified.
    """
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: refusing to save a checkpoint without keys {missing}")
    sealed = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    sealed[CHECKSUM_KEY] = state_checksum(sealed)
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            torch.save(sealed, fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename makes it the checkpoint
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(_write_failure(path, exc)) from exc


def _write_failure(path: Path, exc: BaseException) -> str:
    """A one-line reason for a failed checkpoint write.

    torch's zip writer reports a failed write as "[enforce fail at inline_container.cc]
    unexpected pos"; the ``OSError`` of the file write (e.g. ``ENOSPC``) is in the
    exception's context. Without one, the free space of the folder decides whether to call
    it a full disk.
    """
    cause = _os_error(exc)
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: cannot save the checkpoint: no space left on the device"
    if cause is not None:
        return f"{path}: cannot save the checkpoint: {cause.strerror or cause}"
    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < 1024 * 1024
    except OSError:
        full = False
    if full:
        return f"{path}: cannot save the checkpoint: the disk is full"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{path}: cannot save the checkpoint: the write failed ({first})"


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` along ``exc``'s cause and context chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and verify its checksum; a clear
    :class:`CheckpointError` naming the file if it is not one of ours, is damaged, or
    predates checksums."""
    ckpt = _read_checkpoint(path, map_location)
    stored = ckpt.get(CHECKSUM_KEY)
    if stored is None:
        raise CheckpointError(
            f"{path}: checkpoint has no checksum (written by an older forcenet), so damage "
            f"cannot be detected; if you trust the file, add one with "
            f"`forcenet checkpoint-resave {path}`, or retrain"
        )
    if stored != state_checksum(ckpt):
        raise CheckpointError(
            f"{path}: checkpoint is damaged: its content does not match the checksum "
            "written when it was saved; restore it from a copy or retrain"
        )
    return ckpt


def resave_checkpoint(path: Path, out: Path | None = None) -> dict[str, Any]:
    """Re-save a checkpoint that predates checksums, with its checksum, to ``out``
    (default: in place, atomically). A file that has a checksum is verified as by
    :func:`load_checkpoint`, so a damaged one is refused, not sealed. Returns
    ``{"checkpoint", "out", "checksum", "had_checksum"}``."""
    path = Path(path)
    ckpt = _read_checkpoint(path, "cpu")
    had = CHECKSUM_KEY in ckpt
    if had:
        load_checkpoint(path)  # raises if damaged
    target = Path(out) if out is not None else path
    save_checkpoint(target, ckpt)
    return {
        "checkpoint": str(path),
        "out": str(target),
        "checksum": state_checksum(ckpt),
        "had_checksum": had,
    }


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The checkpoint dict of ``path``, its structure checked, its checksum not."""
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
