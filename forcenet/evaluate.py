"""Evaluate a checkpoint on OC20 splits or ASE files: metrics, covariance, speed.

:func:`evaluate_checkpoint` rebuilds the model from the checkpoint alone and, for every
input (:mod:`forcenet.inputs`), computes the OC20 metrics of :mod:`forcenet.metrics` over
free atoms, the inference throughput (graphs/s and atoms/s of the forward pass, the first
batch excluded as warm-up), and the rotation-covariance error: the mean |F(x)·R − F(x·R)|
over free atoms × 3 components (eV/Å, rows are vectors) for a few Haar-random rotations
of the first structures. Rotating ``pos`` and ``cell`` together keeps the integer
``cell_offsets`` and the edge list valid, so the same graph is reused. An exactly
covariant model scores ~0 (float32 noise); ForceNet and GNS learn covariance only through
augmentation, and this number says how well they did, in the same unit as ``forces_mae``.

It returns the long table of :mod:`forcenet.tables`; the caller writes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, first_graphs
from forcenet.data.graphs import GraphSettings
from forcenet.data.online import OnTheFlyGraphs
from forcenet.distributed import pick_device
from forcenet.geometry import random_rotation, rotate_batch
from forcenet.inference import predict, sync
from forcenet.inputs import check_outputs
from forcenet.metrics import OC20Metrics
from forcenet.scaling import referenced_elements, unreferenced_warning
from forcenet.tables import TRAINING_ROWS, PredictionWriter, long_table

Input = tuple[str, Iterable[Batch]]  # (split name, its batches)


@dataclass(frozen=True)
class RotationCheck:
    """The rotation-covariance measurement: ``samples`` Haar-random rotations of exactly
    the first ``structures`` structures of each split (the same cost for every model and
    batch size), drawn from ``seed``."""

    samples: int = 4
    structures: int = 16
    seed: int = 0


def evaluate_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    keep_graphs: int = 0,
    on_batch: Callable[[Batch, Tensor], None] | None = None,
    builder: OnTheFlyGraphs | None = None,
) -> tuple[dict[str, float], list[Batch]]:
    """One pass over ``batches``: OC20 metrics plus ``inference_graphs_per_s`` and
    ``inference_atoms_per_s``. Returns the metrics and the first batches (on CPU) holding
    at least ``keep_graphs`` structures, for the rotation check. ``on_batch(batch,
    forces)`` is called after each forward pass (used to stream predictions). The kept
    structures are exactly the first ``keep_graphs``, whatever the batch size, so the
    rotation check costs the same for every model and batch size. ``builder``: builds the
    edges of batches that come without (on-the-fly graphs) on ``device``, outside the
    timed forward pass."""
    metrics = OC20Metrics()
    kept: list[Batch] = []
    n_kept = 0
    seconds, graphs, atoms, n_batches = 0.0, 0, 0, 0
    for cpu_batch in batches:
        batch = batch_to(cpu_batch, device)
        if builder is not None and K.EDGE_INDEX not in batch:
            batch = builder(batch)
            cpu_batch = batch_to(batch, "cpu")  # the kept structures carry their edges
        sync(device)
        start = time.perf_counter()
        out = predict(model, batch)
        sync(device)
        elapsed = time.perf_counter() - start
        n_batches += 1
        timing = (elapsed, int(batch[K.NATOMS].shape[0]), int(batch[K.NATOMS].sum()))
        if n_batches == 1:  # pays for warm-up (allocations, kernels): used only if alone
            first = timing
        else:
            seconds, graphs, atoms = seconds + timing[0], graphs + timing[1], atoms + timing[2]
        metrics.update(out, batch)
        if on_batch is not None:
            on_batch(batch, out[K.OUT_FORCES])
        if n_kept < keep_graphs:  # exactly keep_graphs structures, not whole batches
            part = first_graphs(cpu_batch, keep_graphs - n_kept)
            kept.append(part)
            n_kept += int(part[K.NATOMS].shape[0])
    if n_batches == 0:
        raise ValueError("no structures to evaluate")
    if n_batches == 1:
        seconds, graphs, atoms = first
    result = metrics.compute()
    result["inference_graphs_per_s"] = graphs / seconds if seconds > 0 else float("nan")
    result["inference_atoms_per_s"] = atoms / seconds if seconds > 0 else float("nan")
    return result, kept


def rotation_covariance_error(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    rotations: int,
    device: torch.device,
    seed: int = 0,
) -> float:
    """Mean |F(x) @ R − F(x @ R)| over free atoms × 3 components and ``rotations``
    Haar-random rotations R (eV/Å); NaN when there is nothing to measure."""
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for cpu_batch in batches:
        batch = batch_to(cpu_batch, device)
        free = ~batch[K.FIXED]  # [N]
        base = predict(model, batch)[K.OUT_FORCES].to(torch.float64)  # [N, 3]
        for _ in range(rotations):
            rot = random_rotation(gen, dtype=torch.float64)
            rotated = predict(model, rotate_batch(batch, rot))[K.OUT_FORCES].to(torch.float64)
            diff = (base @ rot.to(base.device) - rotated).abs()[free]  # [M, 3]
            total += float(diff.sum())
            count += diff.numel()
    return total / count if count else float("nan")


def evaluate_model(
    model: nn.Module,
    inputs: Iterable[Input],
    *,
    model_name: str,
    device: str | None = None,
    rotation: RotationCheck = RotationCheck(),
    predictions: PredictionWriter | None = None,
    builder: OnTheFlyGraphs | None = None,
) -> dict[str, dict[str, float]]:
    """``{split: metrics}`` of an eval-mode ``model`` (physical units) on each input;
    per-atom predictions streamed to ``predictions`` when given; ``builder`` builds the
    edges of inputs that come without (on-the-fly graphs)."""
    dev = pick_device(device)
    model = model.to(dev).eval()
    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    known = referenced_elements(model)
    for split, batches in inputs:
        unreferenced = Unreferenced(known)

        def on_batch(b: Batch, f: Tensor, s: str = split, u: Unreferenced = unreferenced) -> None:
            u.add(b)
            if predictions is not None:
                predictions.write(model_name, s, b, f)

        metrics, kept = evaluate_batches(
            model,
            batches,
            device=dev,
            keep_graphs=rotation.structures,
            on_batch=on_batch,
            builder=builder,
        )
        metrics["rotation_covariance_mae"] = rotation_covariance_error(
            model, kept, rotations=rotation.samples, device=dev, seed=rotation.seed
        )
        results[split] = metrics
        print(_split_line(model_name, split, metrics, time.perf_counter() - start), flush=True)
        if unreferenced.elements and "energy_mae" in metrics:
            detail = (
                f"{unreferenced.structures} of {metrics['num_structures']:.0f} structures hold "
            )
            line = unreferenced_warning(
                f"evaluate {model_name}: {split}", unreferenced.elements, detail
            )
            print(line, flush=True)
        start = time.perf_counter()
    return results


class Unreferenced:
    """The structures of a split holding elements outside ``known`` (the elements with a
    reference energy in the model, :func:`forcenet.scaling.referenced_elements`; None:
    the model has no per-element references, and nothing is counted)."""

    def __init__(self, known: frozenset[int] | None) -> None:
        self.known = torch.tensor(sorted(known)) if known is not None else None
        self.elements: set[int] = set()
        self.structures = 0

    def add(self, batch: Batch) -> None:
        if self.known is None:
            return
        z = batch[K.ATOMIC_NUMBERS]  # [N]
        outside = ~torch.isin(z, self.known.to(z.device))  # [N]
        if bool(outside.any()):
            self.elements |= {int(v) for v in z[outside].unique().tolist()}
            self.structures += int(batch[K.BATCH][outside].unique().numel())


def _split_line(model_name: str, split: str, metrics: dict[str, float], seconds: float) -> str:
    """One progress line per evaluated split (readable in a log file)."""
    parts = [
        f"evaluate {model_name}: {split}",
        f"{metrics.get('num_structures', 0):.0f} structures",
    ]
    if "forces_mae" in metrics:
        parts.append(f"force MAE {metrics['forces_mae']:.4f} eV/Å")
    if "energy_mae" in metrics:
        parts.append(f"energy MAE {metrics['energy_mae']:.4f} eV")
    parts.append(f"{seconds:.0f} s")
    return ", ".join(parts)


def evaluate_files(
    model: nn.Module,
    inputs: Sequence[Path],
    *,
    model_name: str,
    settings: GraphSettings,
    graphs: Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
    num_workers: int = 0,
    rotation: RotationCheck = RotationCheck(),
    predictions: Path | None = None,
    on_the_fly: bool = False,
) -> pd.DataFrame:
    """:func:`evaluate_model` on LMDB split folders and/or ASE files (opened by
    :func:`forcenet.inputs.open_input` with the model's graph ``settings``, all before any
    work, so a mismatched store fails early); the long table (empty ``run_id``).
    ``predictions``: stream per-atom predictions to this Parquet file, renamed into place
    only when every input is done. ``on_the_fly``: LMDB splits are read without their
    graph store, and their graphs built with ``settings`` on the evaluation device."""
    from forcenet.inputs import check_split_names, open_input

    opened = [
        open_input(
            p,
            graphs=graphs,
            settings=settings,
            batch_size=batch_size,
            num_workers=num_workers,
            on_the_fly=on_the_fly,
        )
        for p in inputs
    ]
    check_split_names(list(inputs), [split for split, _ in opened])
    writer = PredictionWriter(predictions) if predictions is not None else None
    try:
        results = evaluate_model(
            model,
            opened,
            model_name=model_name,
            device=device,
            rotation=rotation,
            predictions=writer,
            builder=OnTheFlyGraphs(settings) if on_the_fly else None,
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    tables = [long_table(model_name, split, metrics, None) for split, metrics in results.items()]
    return pd.concat(tables, ignore_index=True)


def evaluate_checkpoint(
    checkpoint: Path,
    inputs: Sequence[Path],
    *,
    graphs: Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
    num_workers: int = 0,
    predictions: Path | None = None,
    on_the_fly: bool = False,
) -> pd.DataFrame:
    """Evaluate ``checkpoint`` on LMDB split folders and/or ASE files; the long table.

    ``inputs``: ``<lmdb root>/<split>`` folders (graphs from ``graphs/<split>``, checked
    to have the checkpoint's cutoff/max_neighbors; read with ``num_workers`` DataLoader
    workers) or extxyz/traj/db files with energies and forces (split = file stem; graphs
    built with the checkpoint's settings). The rows of split ``training`` say what the
    training run spent (:func:`training_summary`). ``predictions``: also stream per-atom
    predictions to this Parquet file.
    """
    from forcenet.checkpoint import load_model

    check_outputs({"the predictions": predictions}, read_paths(checkpoint, inputs, graphs))
    model, ckpt = load_model(Path(checkpoint), device="cpu")
    name = str(ckpt["model_name"])
    table = evaluate_files(
        model,
        inputs,
        model_name=name,
        settings=GraphSettings.from_mapping(ckpt["graph"]),
        graphs=graphs,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        predictions=predictions,
        on_the_fly=on_the_fly,
    )
    training = training_summary(Path(checkpoint), ckpt)
    if training:
        training["parameters"] = float(sum(p.numel() for p in model.parameters()))
        table = pd.concat([table, long_table(name, TRAINING_ROWS, training, None)])
    return table.reset_index(drop=True)


def read_paths(
    checkpoint: Path, inputs: Sequence[Path], graphs: Path | None = None
) -> dict[str, Path | None]:
    """Every path an evaluation of ``checkpoint`` reads (``last.pt`` beside it included),
    named for :func:`forcenet.inputs.check_outputs`."""
    paths: dict[str, Path | None] = {"the checkpoint": Path(checkpoint)}
    last = Path(checkpoint).with_name("last.pt")
    if last.exists():
        paths["its training record"] = last
    paths.update({f"input {k}": Path(p) for k, p in enumerate(inputs)})
    paths["the graph store"] = graphs
    return paths


def training_summary(checkpoint: Path, ckpt: dict) -> dict[str, float]:
    """What the training run behind ``checkpoint`` spent: ``train_steps``,
    ``train_graphs_seen``, ``train_epochs`` (passes over the training frames; below 1 the
    model never saw all its data) from ``last.pt`` beside it, the end of the run, when
    there is one; ``selected_step`` (the step of ``checkpoint`` itself, e.g. the best dev
    MAE); ``train_seconds`` only where the checkpoint stores them (a run under a
    wall-clock cap, or written by an older version: checkpoints hold results, not the
    clock). Empty for a checkpoint without training progress."""
    from forcenet.checkpoint import CheckpointError, load_checkpoint

    info = dict(ckpt.get("train_info", {}))
    progress = dict(info.get("progress", {}))
    if not progress:
        return {}
    end, end_info = progress, info
    last = Path(checkpoint).with_name("last.pt")
    if last.is_file() and last.resolve() != Path(checkpoint).resolve():
        try:
            end_info = dict(load_checkpoint(last).get("train_info", {})) or info
            end = dict(end_info.get("progress", {})) or progress
        except CheckpointError:
            end, end_info = progress, info
    summary = {
        "train_steps": float(end.get("step", 0)),
        "train_graphs_seen": float(end.get("graphs_seen", 0)),
        "train_epochs": float(dict(end_info.get("metrics", {})).get("epoch", math.nan)),
        "selected_step": float(progress.get("step", 0)),
    }
    if "elapsed_s" in end:
        summary["train_seconds"] = float(end["elapsed_s"])
    return summary
