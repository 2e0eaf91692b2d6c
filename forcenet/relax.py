"""ML structure relaxations with a trained model.

* :func:`relax_structures` relaxes ASE structures with a :class:`ForceNetCalculator` and an
  ASE optimizer (LBFGS with the settings of OCP's ML relaxations: maxstep 0.04 Å, memory 50,
  damping 1, alpha 70; or FIRE with ASE's defaults). ``FixAtoms`` atoms never move. The
  loop is driven here, not by ``Optimizer.run``: ASE's run loop asks for an energy at
  every step, which force-only models (ForceNet, GNS) do not have, and driving it lets a
  group of structures step in lock-step with one batched forward pass per step.
* :func:`relax_command` is ``forcenet relax CHECKPOINT INPUT... --out DIR``.

Scoring relaxations against the EMT oracle is :mod:`forcenet.oracle`. Every file is
written under a temporary name and renamed when complete (:mod:`forcenet.atomic`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import pandas as pd
from ase import Atoms
from ase.io import Trajectory, read
from ase.io import write as ase_write
from ase.io.trajectory import TrajectoryWriter
from ase.optimize import FIRE, LBFGS
from ase.optimize.optimize import Optimizer

from forcenet.atomic import atomic_write
from forcenet.calculator import ForceNetCalculator
from forcenet.data.frame import check_atoms_geometry, fixed_mask
from forcenet.data.shards import check_regular_file
from forcenet.tables import write_table

OptimizerName = Literal["lbfgs", "fire"]


class LbfgsSettings(TypedDict):
    """Keyword arguments of ASE's ``LBFGS`` that we set."""

    maxstep: float  # Å
    memory: int
    damping: float
    alpha: float


#: LBFGS settings of OCP's ML relaxations (the Open Catalyst Project's IS2RS runs).
LBFGS_SETTINGS: LbfgsSettings = {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}

SUMMARY_COLUMNS = [
    "name",
    "sid",
    "natoms",
    "n_free",
    "steps",
    "fmax",
    "converged",
    "wall_s",
    "trajectory",
]


# --------------------------------------------------------------------------- relaxation


def make_optimizer(name: OptimizerName, atoms: Atoms) -> Optimizer:
    """The ASE optimizer ``name`` on ``atoms``, silent (no log file, no ASE trajectory)."""
    if name == "lbfgs":
        # ase hints logfile as IO | str but opens None as os.devnull (no log)
        return LBFGS(atoms, logfile=None, **LBFGS_SETTINGS)  # type: ignore[arg-type]
    if name == "fire":
        return FIRE(atoms, logfile=None)
    raise ValueError(f"optimizer must be 'lbfgs' or 'fire', got {name!r}")


@dataclass
class _Run:
    """One structure being relaxed: its atoms, optimizer, open trajectory and progress."""

    name: str
    atoms: Atoms
    free: np.ndarray  # [N] bool
    optimizer: Optimizer
    traj_path: Path  # final name; the trajectory is written under a temporary one
    traj: TrajectoryWriter
    steps: int = 0
    fmax: float = float("nan")
    converged: bool = False
    wall_s: float = float("nan")


def _start(
    name: str,
    atoms: Atoms,
    calculator: ForceNetCalculator,
    optimizer: OptimizerName,
    traj_path: Path,
    traj_tmp: Path,
) -> _Run:
    work = atoms.copy()  # the caller's structure is never modified
    work.calc = calculator.clone()
    return _Run(
        name=name,
        atoms=work,
        free=~fixed_mask(work),
        optimizer=make_optimizer(optimizer, work),
        traj_path=traj_path,
        traj=Trajectory(str(traj_tmp), "w"),
    )


def _relax_group(calculator: ForceNetCalculator, runs: list[_Run], fmax: float, steps: int) -> None:
    """Step ``runs`` in lock-step: one batched forward pass per step for all unfinished ones."""
    start = time.perf_counter()
    active = runs
    while active:
        predictions = calculator.predict_many([r.atoms for r in active], batch_size=len(active))
        still = []
        for run, pred in zip(active, predictions, strict=True):
            run.atoms.calc.set_results(run.atoms, pred)
            free_forces = pred["forces"][run.free]  # [N_free, 3] eV/Å
            run.fmax = float(np.linalg.norm(free_forces, axis=1).max()) if run.free.any() else 0.0
            if not np.isfinite(run.fmax):
                raise FloatingPointError(
                    f"structure {run.name}: the model predicted non-finite "
                    f"forces at step {run.steps}"
                )
            run.traj.write(run.atoms)
            # Exactly zero force: a stationary point the optimizer cannot leave (its
            # curvature update would divide by zero), so it counts as converged even at fmax 0.
            run.converged = run.fmax < fmax or run.fmax == 0.0
            if run.converged or run.steps >= steps:
                run.traj.close()  # renamed onto traj_path when the whole group succeeds
                run.wall_s = time.perf_counter() - start
            else:
                run.optimizer.step()  # uses the cached forces: no extra forward pass
                if not np.all(np.isfinite(run.atoms.positions)):
                    raise FloatingPointError(
                        f"structure {run.name}: the optimizer produced non-finite positions "
                        f"at step {run.steps} (degenerate curvature update)"
                    )
                run.steps += 1
                still.append(run)
        active = still


def _names(structures: Sequence[Atoms], names: Sequence[str] | None) -> list[str]:
    if names is None:
        names = [str(a.info.get("sid", k)) for k, a in enumerate(structures)]
    names = [str(n) for n in names]
    if len(names) != len(structures):
        raise ValueError(f"{len(names)} names for {len(structures)} structures")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"structure names must be unique (they name the trajectories): {dupes[:5]}"
        )
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"structure names cannot be used as file names: {bad[:5]}")
    return names


def _summary_row(run: _Run, sid: object) -> dict:
    return {
        "name": run.name,
        "sid": int(sid) if isinstance(sid, int | np.integer) else -1,
        "natoms": len(run.atoms),
        "n_free": int(run.free.sum()),
        "steps": run.steps,
        "fmax": run.fmax,
        "converged": run.converged,
        "wall_s": run.wall_s,
        "trajectory": str(run.traj_path),
    }


def relax_structures(
    calculator: ForceNetCalculator,
    structures: Sequence[Atoms],
    *,
    optimizer: OptimizerName,
    fmax: float,
    steps: int,
    traj_dir: Path,
    batch_size: int = 1,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Relax each structure with the model until max |F| on free atoms < ``fmax`` (eV/Å).

    At most ``steps`` optimizer steps (OC20 uses 200 with ``fmax`` 0, i.e. always all
    steps). ``batch_size`` structures are stepped together with one forward pass per
    step (faster on a GPU; the result of each is the same as relaxing it alone).
    Trajectories (every evaluated state, with model forces) go to
    ``traj_dir/<name>.traj``; ``names`` default to ``info["sid"]`` or the position.

    Returns one row per structure: ``name``, ``sid`` (``info["sid"]`` or -1), ``natoms``,
    ``n_free``, ``steps`` (optimizer steps taken), ``fmax`` (final model max |F| on free
    atoms, eV/Å), ``converged``, ``wall_s`` (seconds from the start of its group to its
    end), ``trajectory`` (path).
    """
    if steps < 0 or not fmax >= 0 or batch_size < 1:
        raise ValueError(
            f"need steps >= 0, fmax >= 0, batch_size >= 1; got {steps}, {fmax}, {batch_size}"
        )
    labels = _names(structures, names)
    for label, atoms in zip(labels, structures, strict=True):  # before any trajectory
        check_atoms_geometry(atoms, f"structure {label}")
    traj_dir = Path(traj_dir)
    traj_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for first in range(0, len(structures), batch_size):
        group = range(first, min(first + batch_size, len(structures)))
        runs: list[_Run] = []
        with ExitStack() as files:  # on success every trajectory is renamed into place
            for k in group:
                path = traj_dir / f"{labels[k]}.traj"
                tmp = files.enter_context(atomic_write(path))
                runs.append(_start(labels[k], structures[k], calculator, optimizer, path, tmp))
                files.callback(runs[-1].traj.close)  # closed before its rename (LIFO)
            _relax_group(calculator, runs, fmax, steps)
        rows += [
            _summary_row(r, structures[k].info.get("sid")) for k, r in zip(group, runs, strict=True)
        ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def final_structure(trajectory: Path) -> Atoms:
    """The last state of a relaxation trajectory written by :func:`relax_structures`."""
    with Trajectory(str(trajectory)) as traj:
        if len(traj) == 0:
            raise ValueError(f"{trajectory}: empty trajectory")
        return traj[-1]


def write_extxyz(path: Path, images: list[Atoms]) -> None:
    """All ``images`` into one extxyz file at ``path``, written atomically."""
    with atomic_write(path) as tmp:
        ase_write(str(tmp), images, format="extxyz")


def read_structures(inputs: Sequence[Path]) -> tuple[list[Atoms], list[str]]:
    """Every structure of every ASE-readable file, with unique names; a structure whose
    positions or cell cannot make a neighbor list is a ``ValueError`` naming it.

    A structure's name is its ``info["sid"]`` when every sid is an integer and unique,
    else ``<file stem>-<index in file>``.
    """
    structures: list[Atoms] = []
    sids: list[str | None] = []
    fallback: list[str] = []
    for path in map(Path, inputs):
        check_regular_file(path)
        try:
            images = read(str(path), index=":")
        except Exception as exc:  # ASE raises many types for unreadable files
            raise ValueError(f"{path}: cannot read structures ({exc})") from exc
        for k, atoms in enumerate(images):
            check_atoms_geometry(atoms, f"{path}: structure {k}")
            structures.append(atoms)
            sid = atoms.info.get("sid")
            sids.append(str(sid) if isinstance(sid, int | np.integer) else None)
            fallback.append(f"{path.stem}-{k}")
    int_sids = [s for s in sids if s is not None]
    if len(int_sids) == len(sids) and len(set(int_sids)) == len(int_sids):
        return structures, int_sids
    if len(set(fallback)) != len(fallback):
        raise ValueError(f"input files with the same name: {[str(p) for p in inputs]}")
    return structures, fallback


def relax_command(
    checkpoint: Path,
    inputs: Sequence[Path],
    out_dir: Path,
    optimizer: OptimizerName = "lbfgs",
    fmax: float = 0.05,
    steps: int = 200,
    *,
    batch_size: int = 1,
    device: str | None = None,
) -> pd.DataFrame:
    """``forcenet relax``: relax the structures of ``inputs`` with the model of ``checkpoint``.

    Writes ``out_dir/trajectories/<name>.traj``, ``out_dir/relaxed.extxyz`` (final
    structures with model forces) and ``out_dir/summary.parquet`` (the returned table of
    :func:`relax_structures` plus ``model``).
    """
    calc = ForceNetCalculator.from_checkpoint(Path(checkpoint), device=device)
    structures, names = read_structures(inputs)
    if not structures:
        raise ValueError(f"no structures in {[str(p) for p in inputs]}")
    out_dir = Path(out_dir)
    table = relax_structures(
        calc,
        structures,
        optimizer=optimizer,
        fmax=fmax,
        steps=steps,
        traj_dir=out_dir / "trajectories",
        batch_size=batch_size,
        names=names,
    )
    table.insert(0, "model", calc.model_name)
    write_extxyz(out_dir / "relaxed.extxyz", [final_structure(p) for p in table.trajectory])
    write_table(table, out_dir / "summary.parquet")
    return table
