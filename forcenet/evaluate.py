"""Evaluate a checkpoint on OC20 splits or ASE files: metrics, predictions, covariance, speed.

``evaluate_checkpoint`` rebuilds the model from the checkpoint alone and, for every input,
computes the OC20 metrics of :mod:`forcenet.metrics` over free atoms, the inference
throughput (graphs/s and atoms/s of the forward pass, the first batch excluded as warm-up),
and the rotation-covariance error: the mean |F(x)·R − F(x·R)| over free atoms × 3
components (eV/Å, rows are vectors) for a few Haar-random rotations of the first
structures. Rotating ``pos`` and ``cell`` together keeps the integer ``cell_offsets`` and
the edge list valid, so the same graph is reused. An exactly covariant model scores ~0
(float32 noise); ForceNet and GNS learn covariance only through augmentation, and this
number says how well they did, in the same unit as ``forces_mae``.

Outputs, each written to a temporary name and renamed when complete:

* the long metrics table (Parquet): ``model, split, metric, value, run_id``;
* optionally per-atom predictions (Parquet): ``model, split, sid, fid, atom, atomic_number,
  tag, fixed, fx, fy, fz, pred_fx, pred_fy, pred_fz`` (eV/Å), streamed batch by batch;
* optionally a flat JSON ``{split: {metric: value}}`` for ``dvc metrics show``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate, first_graphs
from forcenet.distributed import pick_device
from forcenet.geometry import random_rotation, rotate_batch
from forcenet.metrics import OC20Metrics

TABLE_COLUMNS = ["model", "split", "metric", "value", "run_id"]
#: The ``split`` of the rows that describe the training run (steps, seconds, graphs seen).
TRAINING_ROWS = "training"
#: ASE formats accepted as evaluation inputs (all plain data; no pickle-based format).
ASE_FORMATS = ("extxyz", "xyz", "traj", "db", "json")

_PRED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("split", pa.string()),
        ("sid", pa.int64()),
        ("fid", pa.int64()),
        ("atom", pa.int32()),
        ("atomic_number", pa.int16()),
        ("tag", pa.int8()),
        ("fixed", pa.bool_()),
        ("fx", pa.float32()),
        ("fy", pa.float32()),
        ("fz", pa.float32()),
        ("pred_fx", pa.float32()),
        ("pred_fy", pa.float32()),
        ("pred_fz", pa.float32()),
    ]
)


def predict(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """Detached model outputs for one batch; autograd stays on for gradient-force models."""
    needs_grad = bool(getattr(model, "energy_from_gradient", False))
    with torch.set_grad_enabled(needs_grad):
        out = model(batch)
    return {k: v.detach() for k, v in out.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- core passes


class PredictionWriter:
    """Streams per-atom predictions into a Parquet file, renamed into place on close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, _PRED_SCHEMA)

    def write(self, model: str, split: str, batch: Batch, forces: Tensor) -> None:
        """Rows of one batch; ``forces`` [N, 3] predicted, ``batch`` on any device."""
        b = {k: v.cpu() for k, v in batch.items()}
        natoms, graph = b[K.NATOMS], b[K.BATCH]  # [G], [N]
        starts = torch.cumsum(natoms, 0) - natoms  # [G] first atom of each graph
        n = int(graph.shape[0])
        sid = b.get(K.SID, torch.arange(len(natoms))).reshape(-1)[graph]  # [N]
        fid = b.get(K.FID, torch.zeros(len(natoms), dtype=torch.int64)).reshape(-1)[graph]
        true = b.get(K.FORCES, torch.full((n, 3), float("nan"))).numpy()
        pred = forces.detach().cpu().to(torch.float32).numpy()
        cols = {
            "model": pa.array([model] * n, pa.string()),
            "split": pa.array([split] * n, pa.string()),
            "sid": sid.numpy(),
            "fid": fid.numpy(),
            "atom": (torch.arange(n) - starts[graph]).numpy().astype(np.int32),
            "atomic_number": b[K.ATOMIC_NUMBERS].numpy().astype(np.int16),
            "tag": b[K.TAGS].numpy().astype(np.int8),
            "fixed": b[K.FIXED].numpy(),
        }
        for c, name in enumerate("xyz"):
            cols[f"f{name}"] = true[:, c].astype(np.float32)
            cols[f"pred_f{name}"] = pred[:, c]
        self._writer.write_table(pa.table(cols, schema=_PRED_SCHEMA))

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def evaluate_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device,
    keep_graphs: int = 0,
    on_batch: Callable[[Batch, Tensor], None] | None = None,
) -> tuple[dict[str, float], list[Batch]]:
    """One pass over ``batches``: OC20 metrics plus ``inference_graphs_per_s`` and
    ``inference_atoms_per_s``. Returns the metrics and the first batches (on CPU) holding
    at least ``keep_graphs`` structures, for the rotation check. ``on_batch(batch,
    forces)`` is called after each forward pass (used to stream predictions). The kept
    structures are exactly the first ``keep_graphs``, whatever the batch size, so the
    rotation check costs the same for every model and batch size."""
    metrics = OC20Metrics()
    kept: list[Batch] = []
    n_kept = 0
    seconds, graphs, atoms, n_batches = 0.0, 0, 0, 0
    for cpu_batch in batches:
        batch = batch_to(cpu_batch, device)
        _sync(device)
        start = time.perf_counter()
        out = predict(model, batch)
        _sync(device)
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


# --------------------------------------------------------------------------- inputs


def _collate_common(samples: list[dict]) -> Batch:
    """Collate on the fields every sample has (e.g. an energy label only some frames carry)."""
    common = set(samples[0]).intersection(*samples[1:])
    return collate([{k: v for k, v in s.items() if k in common} for s in samples])


def _chunks(samples: Iterable[dict], batch_size: int) -> Iterator[Batch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[dict] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield _collate_common(pending)
            pending = []
    if pending:
        yield _collate_common(pending)


def _check_graph_settings(graphs_dir: Path, graph: dict) -> None:
    """Refuse a graph store built with another cutoff/max_neighbors than the model's."""
    from forcenet.data import store

    shards = store.list_lmdb(graphs_dir)
    if not shards:
        raise FileNotFoundError(f"{graphs_dir}: no graph shards (*.lmdb); build the graphs first")
    meta = store.read_meta(shards[0])
    for key in ("cutoff", "max_neighbors"):
        if key in graph and key in meta and float(meta[key]) != float(graph[key]):
            raise ValueError(
                f"{shards[0]}: graphs built with {key}={meta[key]}, but the checkpoint was "
                f"trained with {key}={graph[key]}; rebuild the graphs or pick another store"
            )


def lmdb_batches(
    frames_dir: Path, graphs_dir: Path, *, batch_size: int, num_workers: int = 0
) -> Iterable[Batch]:
    """Batches of an LMDB split (frames + matching graph store), in stored order."""
    from forcenet.data.dataset import FrameDataset, make_loader

    dataset = FrameDataset(frames_dir, graphs_dir)
    return make_loader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, seed=0
    )


def _ase_labels(atoms, index: int) -> dict[str, np.ndarray]:
    """Labels of one ASE frame: forces (constraints not applied), sid/fid, and the
    referenced energy when ``atoms.info`` has ``reference_energy`` (or ``ref_energy``);
    without a reference the energy is left out, so no energy metric compares a total
    energy with a referenced prediction."""
    if atoms.calc is None:
        raise ValueError("no energies/forces stored (no calculator results)")
    out = {
        K.FORCES: np.asarray(atoms.get_forces(apply_constraint=False), dtype=np.float32),
        K.SID: np.asarray(int(atoms.info.get("sid", index)), dtype=np.int64),
        K.FID: np.asarray(int(atoms.info.get("fid", index)), dtype=np.int64),
    }
    ref = atoms.info.get("reference_energy", atoms.info.get("ref_energy"))
    if ref is not None:
        total = float(atoms.get_potential_energy(apply_constraint=False))
        out[K.ENERGY] = np.asarray(total - float(ref), dtype=np.float64)
    return out


def ase_batches(path: Path, *, graph: dict, batch_size: int) -> Iterator[Batch]:
    """Batches of an ASE-readable file with energies and forces; graphs built on the fly
    with the checkpoint's ``cutoff`` and ``max_neighbors``."""
    import ase.io
    from ase.io.formats import filetype

    from forcenet.data.dataset import sample_from_atoms

    fmt = filetype(str(path), read=True)
    if fmt not in ASE_FORMATS:
        raise ValueError(f"{path}: format {fmt!r} is not accepted; use one of {ASE_FORMATS}")

    def samples() -> Iterator[dict]:
        index = 0  # frame being read, for the error message (parse errors included)
        try:
            for atoms in ase.io.iread(str(path), index=":", format=fmt):
                sample = sample_from_atoms(
                    atoms, cutoff=float(graph["cutoff"]), max_neighbors=int(graph["max_neighbors"])
                )
                sample.update(_ase_labels(atoms, index))
                yield sample
                index += 1
        except Exception as exc:
            raise ValueError(f"{path}: frame {index}: {exc}") from exc

    yield from _chunks(samples(), batch_size)


def resolve_input(
    path: Path, *, graphs: Path | None, graph: dict, batch_size: int, num_workers: int = 0
) -> tuple[str, Iterable[Batch]]:
    """``(split, batches)`` for an LMDB split folder or an ASE file (split = file stem).

    An LMDB split ``.../lmdb/<split>`` takes its graphs from ``graphs/<split>`` when
    ``graphs`` (the folder of graph stores) is given, else from ``.../graphs/<split>``.
    """
    path = Path(path)
    if path.is_dir():
        split = path.name
        graphs_dir = (Path(graphs) if graphs else path.parent.parent / "graphs") / split
        _check_graph_settings(graphs_dir, graph)
        return split, lmdb_batches(path, graphs_dir, batch_size=batch_size, num_workers=num_workers)
    if path.is_file():
        return path.stem, ase_batches(path, graph=graph, batch_size=batch_size)
    raise FileNotFoundError(f"evaluation input not found: {path}")


# --------------------------------------------------------------------------- outputs


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write a Parquet file atomically (temporary name, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_metrics_json(table: pd.DataFrame, out: Path) -> None:
    """``{split: {metric: value}}`` for ``dvc metrics show``; NaN becomes null."""
    data: dict[str, dict[str, float | None]] = {}
    for row in table.itertuples(index=False):
        value = float(row.value)
        data.setdefault(row.split, {})[row.metric] = value if math.isfinite(value) else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)


def long_table(
    model: str, split: str, metrics: dict[str, float], run_id: str | None
) -> pd.DataFrame:
    rows = [(model, split, name, float(value), run_id or "") for name, value in metrics.items()]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# --------------------------------------------------------------------------- entry point


def evaluate_model(
    model: nn.Module,
    inputs: Sequence[Path],
    *,
    model_name: str,
    graph: dict,
    out: Path,
    batch_size: int = 16,
    device: str | None = None,
    graphs: Path | None = None,
    num_workers: int = 0,
    rotation_samples: int = 4,
    rotation_structures: int = 16,
    predictions_out: Path | None = None,
    metrics_json: Path | None = None,
    run_id: str | None = None,
    training: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Evaluate an eval-mode ``model`` (physical units) on each input; see
    :func:`evaluate_checkpoint`. ``graph`` holds the ``cutoff``/``max_neighbors`` the model
    was trained with; ``training`` (e.g. :func:`training_summary`) becomes the rows of
    split :data:`TRAINING_ROWS`."""
    dev = pick_device(device)
    model = model.to(dev).eval()
    writer = PredictionWriter(predictions_out) if predictions_out is not None else None
    tables = []
    try:
        for path in inputs:
            split, batches = resolve_input(
                path, graphs=graphs, graph=graph, batch_size=batch_size, num_workers=num_workers
            )
            on_batch = None
            if writer is not None:
                on_batch = lambda b, f, s=split: writer.write(model_name, s, b, f)  # noqa: E731
            metrics, kept = evaluate_batches(
                model, batches, device=dev, keep_graphs=rotation_structures, on_batch=on_batch
            )
            metrics["rotation_covariance_mae"] = rotation_covariance_error(
                model, kept, rotations=rotation_samples, device=dev
            )
            tables.append(long_table(model_name, split, metrics, run_id))
        if training:
            tables.append(long_table(model_name, TRAINING_ROWS, training, run_id))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    table = pd.concat(tables, ignore_index=True)
    write_table(table, out)
    if metrics_json is not None:
        write_metrics_json(table, metrics_json)
    return table


def evaluate_checkpoint(
    checkpoint: Path,
    inputs: Sequence[Path],
    *,
    out: Path,
    batch_size: int = 16,
    device: str | None = None,
    graphs: Path | None = None,
    num_workers: int = 0,
    rotation_samples: int = 4,
    rotation_structures: int = 16,
    predictions_out: Path | None = None,
    metrics_json: Path | None = None,
    model_name: str | None = None,
    run_id: str | None = None,
) -> pd.DataFrame:
    """Evaluate ``checkpoint`` on LMDB split folders and/or ASE files; returns the long table.

    ``inputs``: ``data/lmdb/<split>`` folders (graphs from ``<graphs>/<split>``, default
    ``data/graphs/<split>``, checked to use the checkpoint's cutoff/max_neighbors; read
    with ``num_workers`` DataLoader workers) or
    extxyz/traj/db files with energies and forces (split = file stem; graphs built with
    the checkpoint's settings). ``rotation_samples`` rotations of the first batches
    holding at least ``rotation_structures`` structures give ``rotation_covariance_mae``. ``model_name``
    labels the rows (default: the checkpoint's model name); ``run_id`` defaults to the
    MLflow run in ``run_id.txt`` beside the checkpoint. Writes ``out`` (Parquet),
    ``predictions_out`` and ``metrics_json`` when given.
    """
    from forcenet.checkpoint import load_model
    from forcenet.tracking import read_run_id

    model, ckpt = load_model(Path(checkpoint), device="cpu")
    if run_id is None:
        run_id = read_run_id(Path(checkpoint).parent)
    return evaluate_model(
        model,
        inputs,
        model_name=model_name or str(ckpt["model_name"]),
        graph=dict(ckpt["graph"]),
        out=out,
        batch_size=batch_size,
        device=device,
        graphs=graphs,
        num_workers=num_workers,
        rotation_samples=rotation_samples,
        rotation_structures=rotation_structures,
        predictions_out=predictions_out,
        metrics_json=metrics_json,
        run_id=run_id,
        training=training_summary(Path(checkpoint), ckpt),
    )


def training_summary(checkpoint: Path, ckpt: dict) -> dict[str, float]:
    """What the training run behind ``checkpoint`` spent: ``train_steps``,
    ``train_seconds``, ``train_graphs_seen`` (from ``last.pt`` beside it, the end of the
    run, when there is one) and ``selected_step`` (the step of ``checkpoint`` itself, e.g.
    the best dev MAE). Empty for a checkpoint without training progress."""
    from forcenet.checkpoint import CheckpointError, load_checkpoint

    progress = dict(ckpt.get("train_info", {}).get("progress", {}))
    if not progress:
        return {}
    end = progress
    last = Path(checkpoint).with_name("last.pt")
    if last.is_file() and last.resolve() != Path(checkpoint).resolve():
        try:
            end = dict(load_checkpoint(last).get("train_info", {}).get("progress", {})) or end
        except CheckpointError:
            end = progress
    return {
        "train_steps": float(end.get("step", 0)),
        "train_seconds": float(end.get("elapsed_s", 0.0)),
        "train_graphs_seen": float(end.get("graphs_seen", 0)),
        "selected_step": float(progress.get("step", 0)),
    }
