"""Evaluation inputs as batches: an LMDB split (frames + graph store) or an ASE file.

An LMDB split ``<root>/<split>`` takes its graphs from ``<graphs>/<split>``, checked to
be built with the model's :class:`~forcenet.data.graphs.GraphSettings`; an ASE file
(extxyz, traj, db, json with energies and forces; split = file stem) gets its graphs
built on the fly with the same settings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from forcenet.data import keys as K
from forcenet.data.batch import Batch, collate
from forcenet.data.graphs import GraphSettings, read_graph_settings
from forcenet.data.shards import check_regular_file
from forcenet.tables import TRAINING_ROWS

#: ASE formats accepted as evaluation inputs (all plain data; no pickle-based format).
ASE_FORMATS = ("extxyz", "xyz", "traj", "db", "json")


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


def lmdb_batches(
    frames_dir: Path, graphs_dir: Path | None, *, batch_size: int, num_workers: int = 0
) -> Iterable[Batch]:
    """Batches of an LMDB split (frames + matching graph store, or frames alone for
    on-the-fly graphs), in stored order."""
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
    forces = np.asarray(atoms.get_forces(apply_constraint=False), dtype=np.float64)
    if not np.isfinite(forces).all():
        bad = np.flatnonzero(~np.isfinite(forces).all(axis=1))
        raise ValueError(
            f"forces contain NaN or inf ({len(bad)} atom(s), first atom {int(bad[0])}): "
            "a non-finite label would make every metric NaN"
        )
    out: dict[str, np.ndarray] = {
        K.FORCES: forces.astype(np.float32),
        K.SID: np.asarray(int(atoms.info.get("sid", index)), dtype=np.int64),
        K.FID: np.asarray(int(atoms.info.get("fid", index)), dtype=np.int64),
    }
    ref = atoms.info.get("reference_energy", atoms.info.get("ref_energy"))
    if ref is not None:
        total = float(atoms.get_potential_energy(apply_constraint=False))
        energy = total - float(ref)
        if not np.isfinite(energy):
            raise ValueError(f"energy {total} minus reference_energy {ref} is not finite")
        out[K.ENERGY] = np.asarray(energy, dtype=np.float64)
    return out


def ase_batches(path: Path, *, settings: GraphSettings, batch_size: int) -> Iterator[Batch]:
    """Batches of an ASE-readable file with energies and forces; graphs built on the fly
    with the checkpoint's ``cutoff`` and ``max_neighbors``."""
    import ase.io
    from ase.io.formats import filetype

    from forcenet.data.dataset import sample_from_atoms

    check_regular_file(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (no structures)")
    try:
        fmt = filetype(str(path), read=True)
    except Exception as exc:  # ASE's UnknownFileTypeError and read errors
        raise ValueError(f"{path}: unknown file format ({exc})") from exc
    if fmt not in ASE_FORMATS:
        raise ValueError(f"{path}: format {fmt!r} is not accepted; use one of {ASE_FORMATS}")

    def samples() -> Iterator[dict]:
        index = 0  # frame being read, for the error message (parse errors included)
        try:
            for atoms in ase.io.iread(str(path), index=":", format=fmt):
                sample = sample_from_atoms(
                    atoms, cutoff=settings.cutoff, max_neighbors=settings.max_neighbors
                )
                sample.update(_ase_labels(atoms, index))
                yield sample
                index += 1
        except Exception as exc:
            raise ValueError(f"{path}: frame {index}: {exc}") from exc
        if index == 0:
            raise ValueError(f"{path}: no structures in the file")

    yield from _chunks(samples(), batch_size)


def open_input(
    path: Path,
    *,
    graphs: Path | None,
    settings: GraphSettings,
    batch_size: int,
    num_workers: int = 0,
    on_the_fly: bool = False,
) -> tuple[str, Iterable[Batch]]:
    """``(split, batches)`` for an LMDB split folder or an ASE file (split = file stem).

    An LMDB split folder needs ``graphs``, the root of the graph stores: its graphs are
    ``graphs/<split>``, refused unless built with ``settings``. With ``on_the_fly`` its
    batches are frames alone, and the evaluation builds their graphs on its device.
    """
    path = Path(path)
    if path.is_dir() and on_the_fly:
        batches = lmdb_batches(path, None, batch_size=batch_size, num_workers=num_workers)
        return path.name, batches
    if path.is_dir():
        if graphs is None:
            raise ValueError(
                f"{path}: an LMDB split needs --graphs (the graph store root) or --on-the-fly"
            )
        graphs_dir = Path(graphs) / path.name
        read_graph_settings(graphs_dir).check_same(
            settings, where=str(graphs_dir), other_name="the checkpoint"
        )
        batches = lmdb_batches(path, graphs_dir, batch_size=batch_size, num_workers=num_workers)
        return path.name, batches
    if path.exists():
        return path.stem, ase_batches(path, settings=settings, batch_size=batch_size)
    raise FileNotFoundError(f"evaluation input not found: {path}")


def check_split_names(inputs: Sequence[Path], names: Sequence[str]) -> None:
    """Raise ``ValueError`` when two inputs would report under one split name (a file's
    stem or a folder's name: ``a/val.extxyz`` and ``b/val.extxyz``), or when one is named
    ``training``, the name of the rows that describe the training run."""
    seen: dict[str, Path] = {}
    for path, name in zip(inputs, names, strict=True):
        if name == TRAINING_ROWS:
            raise ValueError(
                f"{path}: the split name {TRAINING_ROWS!r} is reserved for the rows that "
                "describe the training run; rename the input"
            )
        if name in seen:
            raise ValueError(
                f"{seen[name]} and {path} both give split {name!r} (a split is named by the "
                "file stem or folder name); rename one, so that neither is dropped"
            )
        seen[name] = path


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:  # one of them does not exist yet
        return False


def check_outputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """Raise ``ValueError`` when an output would overwrite an input or another output:
    the same path after resolving links, or the same file (hard links). Keys name the
    paths in the message (e.g. ``"--out"``, ``"the checkpoint"``)."""
    given_outputs = [(k, Path(p)) for k, p in outputs.items() if p is not None]
    given_inputs = [(k, Path(p)) for k, p in inputs.items() if p is not None]
    for n, (name, out) in enumerate(given_outputs):
        for other, path in given_outputs[n + 1 :] + given_inputs:
            if _same_file(out, path):
                raise ValueError(
                    f"{name} {out} is the same file as {other} {path}: it would be "
                    "overwritten; write to another path"
                )
