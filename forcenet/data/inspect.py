"""``forcenet data inspect``: a summary of a raw or LMDB dataset folder.

Accepts a raw split folder (``<k>.extxyz.xz`` shards), a raw root (several split
folders), an LMDB split folder (frames or graphs) or an LMDB root. For each split it
reports frames, atoms per frame, elements, tags, the fixed fraction, force statistics on
free atoms, the energy range and, where a neighbor list exists, edges per atom: the
numbers one checks before spending GPU hours on a dataset. An LMDB split without a
current manifest (an interrupted or unmerged run) is refused, not summarised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from forcenet.data import keys as K
from forcenet.data import raw, store
from forcenet.data.manifest import MANIFEST


class _Stats:
    """Running statistics over sample dicts (frame record, optionally with graph)."""

    def __init__(self) -> None:
        self.natoms: list[int] = []
        self.edges: list[int] = []
        self.elements: Counter[int] = Counter()
        self.tags: Counter[int] = Counter()
        self.fixed = 0
        self.free = 0
        self.force_sum = 0.0  # sum of |F| over free atoms, eV/Å
        self.force_max = 0.0
        self.energy: list[float] = []

    def add(self, sample: dict[str, np.ndarray]) -> None:
        n = len(sample[K.ATOMIC_NUMBERS])
        self.natoms.append(n)
        self.elements.update(sample[K.ATOMIC_NUMBERS].tolist())
        self.tags.update(sample[K.TAGS].tolist())
        free = ~sample[K.FIXED].astype(bool)
        self.fixed += int(n - free.sum())
        self.free += int(free.sum())
        if K.FORCES in sample and free.any():
            norms = np.linalg.norm(sample[K.FORCES].astype(np.float64)[free], axis=1)  # [n_free]
            self.force_sum += float(norms.sum())
            self.force_max = max(self.force_max, float(norms.max()))
        if K.ENERGY in sample:
            self.energy.append(float(sample[K.ENERGY]))
        if K.EDGE_INDEX in sample:
            self.edges.append(int(sample[K.EDGE_INDEX].shape[1]))

    def result(self) -> dict[str, Any]:
        if not self.natoms:
            return {"frames": 0}
        natoms = np.array(self.natoms)
        total = int(natoms.sum())
        out: dict[str, Any] = {
            "frames": len(natoms),
            "atoms_per_frame": {
                "min": int(natoms.min()),
                "mean": float(natoms.mean()),
                "max": int(natoms.max()),
            },
            "elements": {chemical_symbols[z]: c for z, c in sorted(self.elements.items())},
            "tags": {int(t): c for t, c in sorted(self.tags.items())},
            "fixed_fraction": self.fixed / total,
            "free_atoms": self.free,
            "force_free_mean_abs": self.force_sum / self.free if self.free else None,
            "force_free_max_abs": self.force_max if self.free else None,
            "energy_min": min(self.energy) if self.energy else None,
            "energy_max": max(self.energy) if self.energy else None,
        }
        if self.edges:
            per_atom = np.array(self.edges) / natoms  # [frames]
            out["edges_per_atom"] = {
                "min": float(per_atom.min()),
                "mean": float(np.sum(self.edges) / total),
                "max": float(per_atom.max()),
            }
        return out


def _summarise(samples: Iterable[dict[str, np.ndarray]], max_frames: int | None) -> dict[str, Any]:
    stats = _Stats()
    for sample in islice(samples, max_frames):
        stats.add(sample)
    return stats.result()


def _is_raw_split(path: Path) -> bool:
    return any(path.glob(f"*{raw.XYZ_SUFFIX}"))


def _is_lmdb_split(path: Path) -> bool:
    return (path / MANIFEST).is_file() or bool(store.list_lmdb(path))


def _lmdb_samples(split_dir: Path, graphs_dir: Path | None) -> tuple[str, Iterator[dict]]:
    """(kind, samples) of an LMDB split; a graph split is read with its frames."""
    from forcenet.data.dataset import FrameDataset  # torch only when needed

    first = store.list_lmdb(split_dir)
    if not first:
        raise store.StoreError(f"{split_dir}: no {store.SUFFIX} shards")
    meta = store.read_meta(first[0])
    # FrameDataset refuses a split (frames or graphs) without a current manifest
    if meta["kind"] == store.KIND_GRAPHS:
        dataset = FrameDataset(Path(meta["source"]["dir"]), split_dir)
    else:
        dataset = FrameDataset(split_dir, graphs_dir)
    return meta["kind"], (dataset[i] for i in range(len(dataset)))


def _split_summary(path: Path, graphs: Path | None, max_frames: int | None) -> dict[str, Any]:
    if _is_lmdb_split(path):
        kind, samples = _lmdb_samples(path, graphs)
    else:
        kind, samples = "raw", (frame.to_record() for frame in raw.iter_split(path))
    return {"kind": kind, **_summarise(samples, max_frames)}


def inspect_path(path: Path, *, graphs: Path | None = None, max_frames: int | None = None) -> dict:
    """Summary of a raw/LMDB split folder or a root of split folders.

    ``graphs``: the graph folder paired with an LMDB frame folder (same level: split or
    root), to report edges per atom (a graph folder is always read with its frames).
    ``max_frames``: summarise only the first frames of each split (quick look at a big
    split). Returns ``{"path", "splits": {name: {"kind", "frames", ...}}}``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder")
    if _is_lmdb_split(path) or _is_raw_split(path):
        splits = {path.name: _split_summary(path, graphs, max_frames)}
    else:
        dirs = [
            d
            for d in sorted(path.iterdir())
            if d.is_dir() and (_is_lmdb_split(d) or _is_raw_split(d))
        ]
        if not dirs:
            raise ValueError(f"{path}: neither a raw/LMDB split folder nor a root of split folders")
        splits = {}
        for d in dirs:
            g = graphs / d.name if graphs is not None and (graphs / d.name).is_dir() else None
            splits[d.name] = _split_summary(d, g, max_frames)
    return {"path": str(path), "splits": splits}


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summary: dict) -> str:
    """A human-readable multi-line rendering of :func:`inspect_path`'s result."""
    lines = [f"{summary['path']}"]
    for name, s in summary["splits"].items():
        lines.append(f"  {name} ({s['kind']}): {s['frames']} frames")
        if not s["frames"]:
            continue
        a = s["atoms_per_frame"]
        lines.append(f"    atoms/frame   min {a['min']}  mean {a['mean']:.1f}  max {a['max']}")
        lines.append(
            "    elements      " + ", ".join(f"{el} {c}" for el, c in s["elements"].items())
        )
        lines.append("    tags          " + ", ".join(f"{t}: {c}" for t, c in s["tags"].items()))
        lines.append(f"    fixed         {100 * s['fixed_fraction']:.1f} % of atoms")
        lines.append(
            f"    |F| free      mean {_fmt(s['force_free_mean_abs'])}  "
            f"max {_fmt(s['force_free_max_abs'])} eV/Å"
        )
        lines.append(f"    energy        {_fmt(s['energy_min'])} .. {_fmt(s['energy_max'])} eV")
        if "edges_per_atom" in s:
            e = s["edges_per_atom"]
            lines.append(
                f"    edges/atom    min {e['min']:.1f}  mean {e['mean']:.1f}  max {e['max']:.1f}"
            )
    return "\n".join(lines)
