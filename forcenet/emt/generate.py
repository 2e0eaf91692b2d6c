"""The embedded default dataset (``data.source: emt``): OC20-like S2EF data labelled by EMT.

Each *system* is one adsorbate on a small metal or alloy slab, relaxed and then run as MD
under EMT; how one system is sampled, labelled and filtered is in
:mod:`forcenet.emt.system`. This module plans the systems of every split, runs them
over worker processes and writes the dataset.

Splits mirror OC20 S2EF: ``train`` and ``val_id`` draw from the in-domain adsorbates and
catalysts, ``val_ood_ads`` from the held-out adsorbates on in-domain catalysts,
``val_ood_cat`` from in-domain adsorbates on held-out catalysts, ``val_ood_both`` from
both held-out sets (the partitions are fixed tables in :mod:`forcenet.emt.adsorbates`
and :mod:`forcenet.emt.slabs`). System ``i`` of split ``s`` has
``sid = SID_STRIDE * s + i`` and all its random choices come from
``numpy.random.default_rng([seed, s, i, ...])``: the output depends on the seed only,
not on the number of workers.

Outputs: ``out_dir/<split>/<k>.extxyz.xz`` + ``<k>.txt.xz`` (the raw OC20 layout, see
:mod:`forcenet.data.raw`), ``out_dir/systems.csv`` (one row per system), and
``out_dir/report.json`` (the returned report without its timing fields, so that the
output is byte-identical for a given seed). With ``is2rs_dir``, the first
``4 * is2rs_systems`` systems of each validation split are candidates for relaxation
benchmarking: their relaxation is continued to ``is2rs_fmax`` and the first
``is2rs_systems`` that converge without a structural problem are kept.
``is2rs_dir/<split>_initial.extxyz`` holds their starting placements (the rattled
structure of S2EF frame ``fid`` 0), ``<split>_relaxed.extxyz`` the EMT-relaxed structures
with energy and forces, in the same order, with ``sid`` (and ``reference_energy``,
``adsorbate``, ``catalyst``, ``facet``, ``site``) in ``atoms.info``. Everything is
written under temporary names and renamed when complete. Call from a script guarded by
``if __name__ == "__main__"``: worker processes are spawned.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write as ase_write
from threadpoolctl import threadpool_limits

from forcenet.atomic import write_text
from forcenet.data import keys as K
from forcenet.data.frame import Frame
from forcenet.data.raw import write_shard
from forcenet.data.workers import worker_pool
from forcenet.emt.adsorbates import ID_ADSORBATES, OOD_ADSORBATES
from forcenet.emt.slabs import FACETS, ID_CATALYSTS, OOD_CATALYSTS, SITES, relax_clean_slab
from forcenet.emt.system import SystemResult, SystemSettings, SystemSpec, run_system
from forcenet.progress import progress

SID_STRIDE = 1_000_000
IS2RS_CANDIDATES = 4  # candidate systems per requested IS2RS system (EMT often dissociates)

#: split -> (adsorbate pool, catalyst pool)
SPLIT_POOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    K.TRAIN: (ID_ADSORBATES, ID_CATALYSTS),
    "val_id": (ID_ADSORBATES, ID_CATALYSTS),
    "val_ood_ads": (OOD_ADSORBATES, ID_CATALYSTS),
    "val_ood_cat": (ID_ADSORBATES, OOD_CATALYSTS),
    "val_ood_both": (OOD_ADSORBATES, OOD_CATALYSTS),
}


def plan_systems(
    seed: int, n_systems: Mapping[str, int], is2rs_systems: int = 0
) -> list[SystemSpec]:
    """The systems of every split, in split order then index: deterministic in ``seed``."""
    specs = []
    for s, split in enumerate(K.SPLITS):
        adsorbates, catalysts = SPLIT_POOLS[split]
        for i in range(int(n_systems.get(split, 0))):
            rng = np.random.default_rng([seed, s, i, 0])
            facet = str(rng.choice(list(FACETS)))
            specs.append(
                SystemSpec(
                    split=split,
                    index=i,
                    sid=SID_STRIDE * s + i,
                    adsorbate=str(rng.choice(adsorbates)),
                    catalyst=str(rng.choice(catalysts)),
                    facet=facet,
                    site=str(rng.choice(SITES[facet])),
                    is2rs=split != K.TRAIN and i < IS2RS_CANDIDATES * is2rs_systems,
                )
            )
    return specs


# --------------------------------------------------------------------------- driver


def _init_worker() -> None:
    # One BLAS thread per process: results must not depend on how work is spread.
    threadpool_limits(limits=1)


@contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """An ordered, lazy ``map`` over ``workers`` processes (in-process when ``workers == 1``)."""
    if workers == 1:
        with threadpool_limits(limits=1):
            yield map
        return
    # spawn, not fork: the parent may hold threads (torch, tqdm); a crashed worker raises
    # BrokenProcessPool instead of hanging. The workers exit when this process dies.
    with worker_pool(workers, start_method="spawn", initializer=_init_worker) as pool:
        yield pool.map


def _call_slab(args: tuple[int, str, str]) -> tuple[np.ndarray, float]:
    return relax_clean_slab(*args)


def _call_system(args: tuple[SystemSpec, np.ndarray, float, SystemSettings]) -> SystemResult:
    return run_system(*args)


class _SplitWriter:
    """Streams frames of one split into shards of ``shard_size`` frames."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory, self.shard_size = directory, shard_size
        self.buffer: list[Frame] = []
        self.shards = 0
        self.frames = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, frames: list[Frame]) -> None:
        self.buffer += frames
        while len(self.buffer) >= self.shard_size:
            self._flush(self.buffer[: self.shard_size])
            self.buffer = self.buffer[self.shard_size :]

    def close(self) -> None:
        if self.buffer:
            self._flush(self.buffer)
            self.buffer = []

    def _flush(self, frames: list[Frame]) -> None:
        self.frames += write_shard(self.directory, self.shards, frames)
        self.shards += 1


def _write_extxyz(path: Path, images: list[Atoms]) -> None:
    """All ``images`` into one extxyz file, written to a temporary name and renamed."""
    buf = io.StringIO()
    ase_write(buf, images, format="extxyz")
    write_text(path, buf.getvalue())


def _check_args(n_systems: Mapping[str, int], counts: dict[str, int]) -> None:
    unknown = set(n_systems) - set(K.SPLITS)
    if unknown:
        raise ValueError(f"n_systems: unknown split(s) {sorted(unknown)}; known: {K.SPLITS}")
    for name, value in {**{f"n_systems.{k}": v for k, v in n_systems.items()}, **counts}.items():
        if not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if any(v >= SID_STRIDE for v in n_systems.values()):
        raise ValueError(f"n_systems: at most {SID_STRIDE - 1} systems per split")
    for name in ("frames_per_system", "workers", "shard_size", "relax_steps"):
        if counts[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {counts[name]}")


#: Columns of ``systems.csv``.
SYSTEM_FIELDS = (
    "sid",
    "split",
    "index",
    "adsorbate",
    "catalyst",
    "facet",
    "site",
    "reference_energy",
    "relax_steps",
    "frames",
    "natoms",
)


def _summary_row(r: SystemResult) -> dict:
    s = r.spec
    return {
        "sid": s.sid,
        "split": s.split,
        "index": s.index,
        "adsorbate": s.adsorbate,
        "catalyst": s.catalyst,
        "facet": s.facet,
        "site": s.site,
        "reference_energy": repr(r.reference_energy),
        "relax_steps": r.relax_length,
        "frames": len(r.frames),
        "natoms": r.frames[0].natoms if r.frames else "",
    }


def generate_emt(
    out_dir: Path,
    *,
    seed: int,
    n_systems: Mapping[str, int],
    frames_per_system: int = 14,
    md_frames_per_system: int = 6,
    relax_steps: int = 40,
    md_temperature_K: float = 600.0,
    max_force: float = 15.0,
    workers: int = 2,
    shard_size: int = 5000,
    is2rs_dir: Path | None = None,
    is2rs_systems: int = 8,
    is2rs_fmax: float = 0.02,
) -> dict:
    """Generate the EMT dataset into ``out_dir`` (replaced as a whole); returns the report.

    ``n_systems`` maps split names (:data:`forcenet.data.keys.SPLITS`) to system counts;
    ``frames_per_system`` relaxation frames and ``md_frames_per_system`` MD frames are
    taken per system before rejections; ``relax_steps`` caps the sampled BFGS relaxation;
    ``max_force`` (eV/Å) is the force cap; ``workers`` processes share the systems
    (the output does not depend on it); ``shard_size`` frames go in each raw shard. The
    report holds per-split system/frame counts, rejected frames by reason, IS2RS counts,
    wall time and frames per second.
    """
    counts = {
        "seed": seed,
        "frames_per_system": frames_per_system,
        "md_frames_per_system": md_frames_per_system,
        "relax_steps": relax_steps,
        "workers": workers,
        "shard_size": shard_size,
        "is2rs_systems": is2rs_systems,
    }
    _check_args(n_systems, counts)
    settings = SystemSettings(
        seed=int(seed),
        frames_per_system=frames_per_system,
        md_frames_per_system=md_frames_per_system,
        relax_steps=relax_steps,
        md_temperature_K=float(md_temperature_K),
        max_force=float(max_force),
        is2rs_fmax=float(is2rs_fmax),
    )
    start = time.perf_counter()
    specs = plan_systems(settings.seed, n_systems, is2rs_systems if is2rs_dir else 0)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _mapper(workers) as pmap:
            results = _simulate(pmap, specs, settings)
            report, rows, is2rs = _collect(results, tmp, shard_size, is2rs_systems)
        report["seed"] = settings.seed
        report["frames"] = sum(e["frames"] for e in report["splits"].values())
        write_text(tmp / "systems.csv", _csv(rows))
        # report.json holds only seed-determined numbers, so the output stays reproducible.
        write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        if is2rs_dir is not None:
            _write_is2rs(Path(is2rs_dir), is2rs)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    report.update(
        workers=workers,
        seconds=round(seconds, 2),
        frames_per_second=round(report["frames"] / max(seconds, 1e-9), 2),
    )
    return report


def _simulate(pmap: Callable, specs: list[SystemSpec], settings: SystemSettings) -> Iterable:
    """Relax every clean slab the systems need, then run the systems; results in order."""
    keys = list(dict.fromkeys((s.catalyst, s.facet) for s in specs))
    slabs = dict(zip(keys, pmap(_call_slab, [(settings.seed, *k) for k in keys]), strict=True))
    jobs = [(s, *slabs[(s.catalyst, s.facet)], settings) for s in specs]
    return progress(pmap(_call_system, jobs), total=len(jobs), desc="emt systems", unit="system")


def _collect(results: Iterable[SystemResult], tmp: Path, shard_size: int, is2rs_systems: int):
    """Stream results into per-split shards; returns (report, csv rows, IS2RS pairs)."""
    writers: dict[str, _SplitWriter] = {}
    report: dict = {"splits": {}}
    rows: list[dict] = []
    is2rs: dict[str, list[tuple[Atoms, Atoms]]] = {s: [] for s in K.VAL_SPLITS}
    for r in results:
        split = r.spec.split
        if split not in writers:
            writers[split] = _SplitWriter(tmp / split, shard_size)
            report["splits"][split] = {
                "systems": 0,
                "frames": 0,
                "atoms": 0,
                "rejected": Counter(),
                "is2rs": 0,
                "is2rs_rejected": Counter(),
            }
        entry = report["splits"][split]
        writers[split].add(r.frames)
        entry["systems"] += 1
        entry["frames"] += len(r.frames)
        entry["atoms"] += sum(f.natoms for f in r.frames)
        entry["rejected"].update(r.rejected)
        # an IS2RS result has both structures (set together in emt_system._is2rs)
        if r.initial is not None and r.relaxed is not None and entry["is2rs"] < is2rs_systems:
            is2rs[split].append((r.initial, r.relaxed))
            entry["is2rs"] += 1
        if r.is2rs_problem:
            entry["is2rs_rejected"][r.is2rs_problem] += 1
        rows.append(_summary_row(r))
    for w in writers.values():
        w.close()
    for entry in report["splits"].values():
        for name in ("rejected", "is2rs_rejected"):
            entry[name] = dict(sorted(entry[name].items()))
        entry["mean_atoms"] = round(entry.pop("atoms") / max(entry["frames"], 1), 2)
    return report, rows, is2rs


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SYSTEM_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_is2rs(directory: Path, pairs: dict[str, list[tuple[Atoms, Atoms]]]) -> None:
    """``<split>_initial.extxyz`` and ``<split>_relaxed.extxyz`` for each validation split."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, items in pairs.items():
        _write_extxyz(directory / f"{split}_initial.extxyz", [a for a, _ in items])
        _write_extxyz(directory / f"{split}_relaxed.extxyz", [b for _, b in items])
