"""The embedded default dataset (``data.source: emt``): OC20-like S2EF data labelled by EMT.

Each *system* is one adsorbate (:mod:`forcenet.data.adsorbates`) placed binding-atom-down
at a random top/bridge/hollow site of a small metal or alloy slab
(:mod:`forcenet.data.slabs`), rattled (free atoms, :data:`RATTLE_STD` Å), then

1. relaxed with ASE's BFGS under EMT until max |F| on free atoms < :data:`RELAX_FMAX`
   eV/Å or ``relax_steps`` steps; ``frames_per_system`` frames are taken evenly along that
   trajectory (so the first, high-force frame is always included);
2. run as Langevin MD at ``md_temperature_K`` from the last relaxation frame;
   ``md_frames_per_system`` frames, one every :data:`MD_STRIDE` steps of 1 fs.

Labels are the EMT total energy and the raw forces on every atom (fixed ones included,
``apply_constraint=False``, as in OC20). The per-system reference energy is the EMT
energy of the relaxed clean slab plus the gas-phase references of the adsorbate atoms,
so ``energy = total - reference`` is an adsorption energy of order eV.

Rejected frames are dropped and counted by reason:

* ``max_force``: some atom's |F| exceeds ``max_force`` eV/Å (the frame alone is dropped);
* ``desorbed``: the lowest adsorbate atom is more than ``DESORB_HEIGHT`` (3 Å) above the
  initial top slab layer, or any adsorbate atom leaves the adsorbate zone
  (:data:`forcenet.data.slabs.ADSORBATE_ZONE` Å), which would eat into the vacuum;
* ``dissociated``: a bond of the placed adsorbate stretched beyond
  ``DISSOCIATION_FACTOR`` (1.6) times its covalent length;
* ``slab_displaced``: a slab atom moved more than ``SLAB_DISPLACEMENT`` (1 Å).

(thresholds in :mod:`forcenet.data.adsorbates`, :class:`StructureCheck`). The last three
end the trajectory they occur in (what follows is the same broken structure); the
breaking frame is the one counted. EMT is a metal potential: adsorbates with two or
more H atoms (``*OH2``, ``*NH3``, ``*CH2OH``...) often lose an H to the metal, so
roughly a third of the systems end in ``dissociated``; their earlier frames are kept.

Splits mirror OC20 S2EF: ``train`` and ``val_id`` draw from the in-domain adsorbates and
catalysts, ``val_ood_ads`` from the held-out adsorbates on in-domain catalysts,
``val_ood_cat`` from in-domain adsorbates on held-out catalysts, ``val_ood_both`` from
both held-out sets (the partitions are fixed tables in the two modules above). System
``i`` of split ``s`` has ``sid = SID_STRIDE * s + i`` and all its random choices come from
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
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write as ase_write
from ase.md.langevin import Langevin
from ase.optimize import BFGS
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from forcenet.atomic import write_text
from forcenet.data import keys as K
from forcenet.data.adsorbates import (
    ID_ADSORBATES,
    OOD_ADSORBATES,
    StructureCheck,
    adsorbate_reference,
    place_adsorbate,
)
from forcenet.data.frame import Frame, fixed_mask
from forcenet.data.raw import write_shard
from forcenet.data.slabs import (
    ADSORBATE_ZONE,
    FACETS,
    ID_CATALYSTS,
    OOD_CATALYSTS,
    SITES,
    catalyst_slab,
    relax_clean_slab,
)

RATTLE_STD = 0.05  # Å, Gaussian displacement of free atoms of the starting placement
RELAX_FMAX = 0.05  # eV/Å, convergence of the sampled relaxation
IS2RS_MAX_STEPS = 500
MD_STRIDE = 5  # MD steps (1 fs each) between sampled frames
MD_FRICTION = 0.01 / units.fs
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


@dataclass(frozen=True)
class SystemSpec:
    """What one system is: the discrete choices, drawn in :func:`plan_systems`."""

    split: str
    index: int
    sid: int
    adsorbate: str
    catalyst: str
    facet: str
    site: str
    is2rs: bool


@dataclass(frozen=True)
class _Settings:
    seed: int
    frames_per_system: int
    md_frames_per_system: int
    relax_steps: int
    md_temperature_K: float
    max_force: float
    is2rs_fmax: float


@dataclass
class SystemResult:
    """Frames and bookkeeping of one system (sent back from a worker)."""

    spec: SystemSpec
    reference_energy: float
    frames: list[Frame]
    rejected: Counter = field(default_factory=Counter)
    relax_length: int = 0
    initial: Atoms | None = None  # IS2RS starting placement
    relaxed: Atoms | None = None  # IS2RS EMT-relaxed structure (None if it failed)
    is2rs_problem: str | None = None  # why an IS2RS candidate was dropped


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


def _label(atoms: Atoms) -> tuple[np.ndarray, float, np.ndarray]:
    """Positions [N, 3], EMT energy and raw forces [N, 3] (fixed atoms included)."""
    forces = atoms.get_forces(apply_constraint=False)
    return atoms.positions.copy(), float(atoms.get_potential_energy()), forces.copy()


def _optimize(
    atoms: Atoms, opt: BFGS, check: StructureCheck, fmax: float, max_steps: int
) -> tuple[list[tuple], str | None, bool]:
    """Labels of the current state and after each optimizer step.

    Stops when the free-atom max |F| < ``fmax`` (converged), after ``max_steps`` steps, or
    at a structural problem (that state is not returned; its reason is). Returns
    ``(labels, problem, converged)``.
    """
    labels: list[tuple] = []
    for step in range(max_steps + 1):
        if step:
            opt.step()
        problem = check(atoms.positions)
        if problem:
            return labels, problem, False
        labels.append(_label(atoms))
        if np.linalg.norm(atoms.get_forces(), axis=1).max() < fmax:
            return labels, None, True
    return labels, None, False


def _md(
    start: Atoms, settings: _Settings, rng: np.random.Generator, check: StructureCheck
) -> tuple[list[tuple], str | None]:
    """Langevin MD from ``start``: labels every :data:`MD_STRIDE` steps, or a problem."""
    atoms = start.copy()
    atoms.calc = EMT()
    # Maxwell-Boltzmann momenta; set_momenta zeroes those of fixed atoms.
    kT = units.kB * settings.md_temperature_K  # eV
    sigma = np.sqrt(atoms.get_masses() * kT)[:, None]  # [N, 1]
    atoms.set_momenta(sigma * rng.standard_normal((len(atoms), 3)))
    dyn = Langevin(
        atoms,
        timestep=1.0 * units.fs,
        temperature_K=settings.md_temperature_K,
        friction=MD_FRICTION,
        fixcm=False,  # the fixed sub-surface atoms already pin the slab
        rng=rng,
        logfile=None,
    )
    labels: list[tuple] = []
    for _ in range(settings.md_frames_per_system):
        dyn.run(MD_STRIDE)
        problem = check(atoms.positions)
        if problem:
            return labels, problem
        labels.append(_label(atoms))
    return labels, None


def _frames(
    atoms: Atoms,
    labels: list[tuple],
    fids: Iterable[int],
    ref: float,
    sid: int,
    max_force: float,
    rejected: Counter,
) -> list[Frame]:
    """Frames of ``labels`` (with frame ids ``fids``) except those over the force cap."""
    fixed = fixed_mask(atoms)
    out = []
    for (pos, energy, forces), fid in zip(labels, fids, strict=True):
        if np.linalg.norm(forces, axis=1).max() > max_force:
            rejected["max_force"] += 1
            continue
        out.append(
            Frame(
                atomic_numbers=atoms.numbers.astype(np.int64),
                pos=pos,
                cell=np.array(atoms.cell, dtype=np.float64),
                pbc=np.array(atoms.pbc, dtype=bool),
                tags=atoms.get_tags().astype(np.int64),
                fixed=fixed.copy(),
                forces=forces,
                total_energy=energy,
                reference_energy=ref,
                sid=sid,
                fid=int(fid),
            )
        )
    return out


def run_system(
    spec: SystemSpec, slab_pos: np.ndarray, slab_energy: float, settings: _Settings
) -> SystemResult:
    """Place, relax and run MD for one system; returns its frames and rejection counts."""
    rng = np.random.default_rng([settings.seed, K.SPLITS.index(spec.split), spec.index, 1])
    slab = catalyst_slab(settings.seed, spec.catalyst, spec.facet)
    slab.positions = slab_pos
    atoms = place_adsorbate(slab, spec.adsorbate, spec.site, rng)
    check = StructureCheck(atoms, ADSORBATE_ZONE)
    free = np.flatnonzero(atoms.get_tags() != K.TAG_SUBSURFACE)
    atoms.positions[free] += rng.normal(0.0, RATTLE_STD, size=(len(free), 3))
    ads_symbols = [
        s
        for s, t in zip(atoms.get_chemical_symbols(), atoms.get_tags(), strict=True)
        if t == K.TAG_ADSORBATE
    ]
    ref = slab_energy + adsorbate_reference(ads_symbols)
    result = SystemResult(spec=spec, reference_energy=ref, frames=[])
    initial = atoms.copy()
    initial.info = {}  # drop ASE's slab-builder metadata
    atoms.calc = EMT()
    opt = BFGS(atoms, logfile=None)
    labels, problem, _ = _optimize(atoms, opt, check, RELAX_FMAX, settings.relax_steps)
    result.relax_length = len(labels)
    if problem:
        result.rejected[problem] += 1
    if not labels:
        return result
    # Evenly along the trajectory, first (rattled, high-force) and last frame included.
    picks = np.unique(np.linspace(0, len(labels) - 1, settings.frames_per_system).round())
    picks = picks.astype(int)
    result.frames = _frames(
        atoms, [labels[p] for p in picks], picks, ref, spec.sid, settings.max_force, result.rejected
    )
    if problem:
        return result
    end = atoms.copy()
    end.positions = labels[-1][0]
    md_labels, md_problem = _md(end, settings, rng, check)
    if md_problem:
        result.rejected[md_problem] += 1
    # MD frame k (0-based) is MD step (k + 1) * MD_STRIDE after the last relaxation frame.
    fids = [len(labels) - 1 + MD_STRIDE * (k + 1) for k in range(len(md_labels))]
    result.frames += _frames(
        atoms, md_labels, fids, ref, spec.sid, settings.max_force, result.rejected
    )
    if spec.is2rs:
        _is2rs(result, initial, atoms, opt, check, settings.is2rs_fmax)
    return result


def _is2rs(
    result: SystemResult,
    initial: Atoms,
    atoms: Atoms,
    opt: BFGS,
    check: StructureCheck,
    fmax: float,
) -> None:
    """Continue the relaxation to ``fmax``; store initial and relaxed structures if it works."""
    labels, problem, converged = _optimize(atoms, opt, check, fmax, IS2RS_MAX_STEPS)
    info = {
        "sid": result.spec.sid,
        "reference_energy": result.reference_energy,
        "adsorbate": result.spec.adsorbate,
        "catalyst": result.spec.catalyst,
        "facet": result.spec.facet,
        "site": result.spec.site,
    }
    if problem or not converged:
        result.is2rs_problem = problem or "not_converged"
        return
    result.initial = initial
    initial.info.update(info)
    pos, energy, forces = labels[-1]
    relaxed = initial.copy()
    relaxed.positions = pos
    relaxed.info.update(info)
    relaxed.calc = SinglePointCalculator(relaxed, energy=energy, forces=forces)
    result.relaxed = relaxed


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
    # BrokenProcessPool instead of hanging.
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        yield pool.map


def _call_slab(args: tuple[int, str, str]) -> tuple[np.ndarray, float]:
    return relax_clean_slab(*args)


def _call_system(args: tuple[SystemSpec, np.ndarray, float, _Settings]) -> SystemResult:
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
    settings = _Settings(
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


def _simulate(pmap: Callable, specs: list[SystemSpec], settings: _Settings) -> Iterable:
    """Relax every clean slab the systems need, then run the systems; results in order."""
    keys = list(dict.fromkeys((s.catalyst, s.facet) for s in specs))
    slabs = dict(zip(keys, pmap(_call_slab, [(settings.seed, *k) for k in keys]), strict=True))
    jobs = [(s, *slabs[(s.catalyst, s.facet)], settings) for s in specs]
    return tqdm(pmap(_call_system, jobs), total=len(jobs), desc="emt systems", unit="system")


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
        if r.relaxed is not None and entry["is2rs"] < is2rs_systems:
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
