"""ML structure relaxations with a trained model, and their evaluation against the EMT oracle.

* :func:`relax_structures` relaxes ASE structures with a :class:`ForceNetCalculator` and an
  ASE optimizer (LBFGS with the OCP settings of reference §7: maxstep 0.04 Å, memory 50,
  damping 1, alpha 70; or FIRE with ASE's defaults). ``FixAtoms`` atoms never move. The
  loop is driven here, not by ``Optimizer.run``: ASE's run loop asks for an energy at
  every step, which force-only models (ForceNet, GNS) do not have, and driving it lets a
  group of structures step in lock-step with one batched forward pass per step.
* :func:`relax_command` is ``forcenet relax CHECKPOINT INPUT... --out DIR``.
* :func:`evaluate_relaxations` relaxes the IS2RS initial structures written by the data
  generator (``<is2rs_dir>/<split>_initial.extxyz``) and compares the results with the
  oracle's relaxed structures (``<split>_relaxed.extxyz``, same order, ``info["sid"]``):
  ADwT (OC20's average distance within threshold), FbT-oracle (fraction of ML-relaxed
  structures whose *EMT* max force on free atoms is below 0.05 eV/Å) and the EMT energy
  of the ML result minus the oracle's own minimum.

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from ase import Atoms
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import Trajectory, read
from ase.io import write as ase_write
from ase.optimize import FIRE, LBFGS
from ase.optimize.optimize import Optimizer

from forcenet.calculator import ForceNetCalculator
from forcenet.evaluate import long_table, write_metrics_json, write_table

OptimizerName = Literal["lbfgs", "fire"]

#: ADwT distance thresholds (Å): 0.01, 0.011, ..., 0.499 (490 values), as in OC20.
ADWT_THRESHOLDS = np.arange(0.01, 0.5, 0.001)
#: FbT-oracle: an ML-relaxed structure counts as relaxed if the oracle's max |F| on free
#: atoms is below this (eV/Å), OC20's force-below-threshold criterion.
FBT_THRESHOLD = 0.05
#: LBFGS settings of OCP's ML relaxations (reference §7).
LBFGS_SETTINGS = {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}
#: Systems whose oracle energy along the ML trajectory is plotted, per split.
PLOT_SYSTEMS = 3

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


# --------------------------------------------------------------------------- ADwT


def free_mask(atoms: Atoms) -> np.ndarray:
    """[N] bool, True for atoms not held by a ``FixAtoms`` constraint."""
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    return ~fixed


def min_image_distances(
    pred_pos: np.ndarray, true_pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> np.ndarray:
    """[N] distances (Å) between ``pred_pos`` and ``true_pos`` [N, 3], OC20 minimum image.

    The displacement is expressed in fractional coordinates and, along each periodic
    axis, wrapped into [-0.5, 0.5) (OC20's ``min_diff``; exact for orthogonal cells).
    """
    delta = np.asarray(pred_pos, np.float64) - np.asarray(true_pos, np.float64)  # [N, 3]
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    periodic = np.asarray(pbc, dtype=bool).reshape(3)
    if not periodic.any():
        return np.linalg.norm(delta, axis=1)
    frac = np.linalg.solve(cell.T, delta.T).T  # [N, 3], delta = frac @ cell
    frac[:, periodic] -= np.floor(frac[:, periodic] + 0.5)
    return np.linalg.norm(frac @ cell, axis=1)


def mean_free_distance(
    pred_pos: np.ndarray,
    true_pos: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    free_mask: np.ndarray,
) -> float:
    """Mean minimum-image distance (Å) over free atoms: ADwT's per-system distance."""
    free = np.asarray(free_mask, dtype=bool)
    if not free.any():
        raise ValueError("ADwT needs at least one free atom")
    return float(min_image_distances(pred_pos, true_pos, cell, pbc)[free].mean())


def adwt(
    pred_pos: np.ndarray,
    true_pos: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    free_mask: np.ndarray,
) -> float:
    """ADwT of one system: fraction of :data:`ADWT_THRESHOLDS` above its mean free distance.

    Averaging this over systems gives OC20's ADwT (the success rate averaged over
    thresholds 0.01..0.499 Å; success means mean distance < threshold, strictly).
    """
    distance = mean_free_distance(pred_pos, true_pos, cell, pbc, free_mask)
    return float(np.mean(distance < ADWT_THRESHOLDS))


# --------------------------------------------------------------------------- relaxation


def make_optimizer(name: OptimizerName, atoms: Atoms) -> Optimizer:
    """The ASE optimizer ``name`` on ``atoms``, silent (no log file, no ASE trajectory)."""
    if name == "lbfgs":
        return LBFGS(atoms, logfile=None, **LBFGS_SETTINGS)
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
    traj_tmp: Path
    traj_path: Path
    traj: Trajectory
    steps: int = 0
    fmax: float = float("nan")
    converged: bool = False
    wall_s: float = float("nan")


def _start(
    name: str,
    atoms: Atoms,
    calculator: ForceNetCalculator,
    optimizer: OptimizerName,
    traj_dir: Path,
) -> _Run:
    work = atoms.copy()  # the caller's structure is never modified
    work.calc = calculator.clone()
    path = traj_dir / f"{name}.traj"
    tmp = traj_dir / f".{name}.traj.{os.getpid()}.tmp"
    return _Run(
        name=name,
        atoms=work,
        free=free_mask(work),
        optimizer=make_optimizer(optimizer, work),
        traj_tmp=tmp,
        traj_path=path,
        traj=Trajectory(str(tmp), "w"),
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
                run.traj.close()
                os.replace(run.traj_tmp, run.traj_path)
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
    traj_dir = Path(traj_dir)
    traj_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for first in range(0, len(structures), batch_size):
        group = range(first, min(first + batch_size, len(structures)))
        runs: list[_Run] = []
        try:
            for k in group:
                runs.append(_start(labels[k], structures[k], calculator, optimizer, traj_dir))
            _relax_group(calculator, runs, fmax, steps)
        finally:
            for run in runs:
                run.traj.close()
                run.traj_tmp.unlink(missing_ok=True)
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


def _write_extxyz(path: Path, images: list[Atoms]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ase_write(str(tmp), images, format="extxyz")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_structures(inputs: Sequence[Path]) -> tuple[list[Atoms], list[str]]:
    """Every structure of every ASE-readable file, with unique names.

    A structure's name is its ``info["sid"]`` when every sid is an integer and unique,
    else ``<file stem>-<index in file>``.
    """
    structures, sids, fallback = [], [], []
    for path in map(Path, inputs):
        try:
            images = read(str(path), index=":")
        except Exception as exc:  # ASE raises many types for unreadable files
            raise ValueError(f"{path}: cannot read structures ({exc})") from exc
        for k, atoms in enumerate(images):
            structures.append(atoms)
            sid = atoms.info.get("sid")
            sids.append(str(sid) if isinstance(sid, int | np.integer) else None)
            fallback.append(f"{path.stem}-{k}")
    if None not in sids and len(set(sids)) == len(sids):
        return structures, sids
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
    _write_extxyz(out_dir / "relaxed.extxyz", [final_structure(p) for p in table.trajectory])
    write_table(table, out_dir / "summary.parquet")
    return table


# --------------------------------------------------------------------------- oracle evaluation


def oracle_check(atoms: Atoms) -> tuple[float, float]:
    """EMT (the oracle) at ``atoms``: (max |F| over free atoms in eV/Å, total energy in eV)."""
    work = atoms.copy()
    work.calc = EMT()
    forces = work.get_forces(apply_constraint=False)  # [N, 3]
    free = free_mask(atoms)
    fmax = float(np.linalg.norm(forces[free], axis=1).max()) if free.any() else 0.0
    return fmax, float(work.get_potential_energy())


def _read_images(path: Path) -> list[Atoms]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IS2RS file not found (run the data generation stage)")
    if path.stat().st_size == 0:
        return []
    return read(str(path), index=":", format="extxyz")


def read_is2rs(is2rs_dir: Path, split: str) -> tuple[list[Atoms], list[Atoms]]:
    """Initial and oracle-relaxed structures of ``split``, checked to pair up record by record."""
    init_path = Path(is2rs_dir) / f"{split}_initial.extxyz"
    relaxed_path = Path(is2rs_dir) / f"{split}_relaxed.extxyz"
    initial, relaxed = _read_images(init_path), _read_images(relaxed_path)
    if len(initial) != len(relaxed):
        raise ValueError(
            f"{init_path} has {len(initial)} structures but {relaxed_path} has {len(relaxed)}"
        )
    for k, (a, b) in enumerate(zip(initial, relaxed, strict=True)):
        where = f"{init_path} / {relaxed_path}: record {k}"
        if "sid" not in a.info or a.info.get("sid") != b.info.get("sid"):
            raise ValueError(f"{where}: sid {a.info.get('sid')!r} vs {b.info.get('sid')!r}")
        if not np.array_equal(a.numbers, b.numbers):
            raise ValueError(f"{where}: the atoms differ between initial and relaxed")
    return initial, relaxed


def _oracle_minimum(relaxed: Atoms) -> float:
    """The oracle's relaxed energy: the file's energy, else EMT recomputed."""
    if relaxed.calc is not None and "energy" in relaxed.calc.results:
        return float(relaxed.calc.results["energy"])
    return oracle_check(relaxed)[1]


def _score(
    model: str,
    split: str,
    table: pd.DataFrame,
    initial: list[Atoms],
    relaxed: list[Atoms],
    where: Path,
) -> pd.DataFrame:
    """Per-system ADwT distance, oracle max force and oracle energy gap of the ML results."""
    rows = []
    for k, (run, init, ref) in enumerate(zip(table.itertuples(), initial, relaxed, strict=True)):
        final = final_structure(Path(run.trajectory))
        free = free_mask(init)
        try:
            oracle_fmax, oracle_energy = oracle_check(final)
            minimum = _oracle_minimum(ref)
        except (KeyError, NotImplementedError) as exc:
            raise ValueError(f"{where}: record {k}: EMT cannot evaluate it ({exc})") from exc
        rows.append(
            {
                "model": model,
                "split": split,
                "sid": int(init.info["sid"]),
                "natoms": run.natoms,
                "n_free": run.n_free,
                "steps": run.steps,
                "converged": run.converged,
                "ml_fmax": run.fmax,
                "wall_s": run.wall_s,
                "distance": mean_free_distance(
                    final.positions, ref.positions, ref.cell, ref.pbc, free
                ),
                "adwt": adwt(final.positions, ref.positions, ref.cell, ref.pbc, free),
                "oracle_fmax": oracle_fmax,
                "fbt": oracle_fmax < FBT_THRESHOLD,
                "oracle_energy": oracle_energy,
                "oracle_min_energy": minimum,
                "oracle_delta_e": oracle_energy - minimum,
                "trajectory": run.trajectory,
            }
        )
    return pd.DataFrame(rows)


def aggregate_relaxations(systems: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, split): ADwT, FbT-oracle, oracle ΔE (eV), convergence, steps.

    ``adwt`` is the mean of the per-system values (= OC20's ADwT), ``fbt_oracle`` the
    fraction of systems with oracle max |F| < :data:`FBT_THRESHOLD`.
    """
    grouped = systems.groupby(["model", "split"], sort=False)
    table = grouped.agg(
        relax_systems=("sid", "size"),
        adwt=("adwt", "mean"),
        relax_mean_distance=("distance", "mean"),
        fbt_oracle=("fbt", "mean"),
        oracle_delta_e_mean=("oracle_delta_e", "mean"),
        oracle_delta_e_median=("oracle_delta_e", "median"),
        relax_converged_fraction=("converged", "mean"),
        relax_mean_steps=("steps", "mean"),
    )
    return table.reset_index()


def metrics_long_table(aggregate: pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """The aggregate in the long ``model, split, metric, value, run_id`` form of evaluate."""
    parts = []
    for row in aggregate.to_dict("records"):
        metrics = {k: float(v) for k, v in row.items() if k not in ("model", "split")}
        parts.append(long_table(row["model"], row["split"], metrics, run_id))
    return pd.concat(parts, ignore_index=True)


def plot_oracle_energy(
    systems: pd.DataFrame, path: Path, *, per_split: int = PLOT_SYSTEMS, max_frames: int = 60
) -> None:
    """PNG: EMT energy along the ML trajectory minus the oracle minimum, a few systems per split.

    EMT is recomputed on (at most ``max_frames``, evenly spaced) trajectory frames, so
    the curve shows whether following the model's forces lowers the *true* energy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(systems["split"]))
    fig, axes = plt.subplots(
        1, max(len(splits), 1), figsize=(4.5 * max(len(splits), 1), 3.5), squeeze=False
    )
    for ax, split in zip(axes[0], splits, strict=False):
        for row in systems[systems.split == split].head(per_split).itertuples():
            with Trajectory(row.trajectory) as traj:
                picks = np.unique(
                    np.linspace(0, len(traj) - 1, min(len(traj), max_frames)).round().astype(int)
                )
                energies = [oracle_check(traj[int(i)])[1] - row.oracle_min_energy for i in picks]
            ax.plot(picks, energies, marker=".", label=f"sid {row.sid}")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set(
            title=f"{systems.model.iloc[0]} · {split}",
            xlabel="ML relaxation step",
            ylabel="E_EMT − E_EMT,min (eV)",
        )
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def evaluate_relaxations(
    checkpoint: Path,
    is2rs_dir: Path,
    splits: Sequence[str],
    *,
    out_dir: Path,
    fmax: float = 0.05,
    steps: int = 200,
    optimizer: OptimizerName = "lbfgs",
    batch_size: int = 16,
    device: str | None = None,
) -> pd.DataFrame:
    """ML-relax the IS2RS initial structures of ``splits`` and score them against EMT.

    Writes to ``out_dir``: ``trajectories/<split>/<sid>.traj``, ``relax_systems.parquet``
    (one row per system), ``relax_metrics.parquet`` (long table, same form as the
    evaluate stage, so the report can join it), ``relax_metrics.json`` (for ``dvc
    metrics``) and ``relax_oracle_energy.png``. Returns the aggregate table
    (:func:`aggregate_relaxations`); splits without IS2RS systems are left out.
    """
    calc = ForceNetCalculator.from_checkpoint(Path(checkpoint), device=device)
    out_dir = Path(out_dir)
    scored = []
    for split in splits:
        initial, relaxed = read_is2rs(Path(is2rs_dir), split)
        if not initial:
            continue
        table = relax_structures(
            calc,
            initial,
            optimizer=optimizer,
            fmax=fmax,
            steps=steps,
            traj_dir=out_dir / "trajectories" / split,
            batch_size=batch_size,
            names=[str(a.info["sid"]) for a in initial],
        )
        where = Path(is2rs_dir) / f"{split}_initial.extxyz"
        scored.append(_score(calc.model_name, split, table, initial, relaxed, where))
    if not scored:
        raise ValueError(f"{is2rs_dir}: no IS2RS systems for splits {list(splits)}")
    systems = pd.concat(scored, ignore_index=True)
    aggregate = aggregate_relaxations(systems)
    long = metrics_long_table(aggregate)
    plot_oracle_energy(systems, out_dir / "relax_oracle_energy.png")
    write_table(systems, out_dir / "relax_systems.parquet")
    write_table(long, out_dir / "relax_metrics.parquet")
    write_metrics_json(long, out_dir / "relax_metrics.json")
    return aggregate


def log_relax_metrics(aggregate: pd.DataFrame, *, run_id: str | None = None) -> None:
    """Log the aggregates to MLflow as ``<split>/<metric>`` (optional; rank 0 only).

    ``run_id``: the model's training run (``tracking.read_run_id(train_dir)``), else a new
    run is created per model.
    """
    try:
        from forcenet import tracking
    except ImportError:  # tracking is optional
        return
    for model, part in aggregate.groupby("model", sort=False):
        run = tracking.attach_run(model=str(model), run_id=run_id, stage="relax")
        tracking.log_split_metrics(run, metrics_long_table(part, run_id))
        tracking.finish_run(run)
