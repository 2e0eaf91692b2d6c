"""Scoring ML relaxations against the EMT oracle (OC20's IS2RS metrics, Chanussot et al. 2021).

:func:`evaluate_relaxations` relaxes the IS2RS initial structures written by the data
generator (``<is2rs_dir>/<split>_initial.extxyz``) with :func:`forcenet.relax.relax_structures`
and compares the results with the oracle's relaxed structures (``<split>_relaxed.extxyz``,
same order, ``info["sid"]``): ADwT (OC20's average distance within threshold,
:func:`forcenet.metrics.adwt`), FbT-oracle (fraction of ML-relaxed structures whose *EMT*
max force on free atoms is below 0.05 eV/Å) and the EMT energy of the ML result minus the
oracle's own minimum. :func:`metrics_long_table` gives the aggregates in the long form of
the evaluation tables.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import Trajectory, read

from forcenet.atomic import atomic_write
from forcenet.calculator import ForceNetCalculator
from forcenet.data.frame import fixed_mask
from forcenet.metrics import adwt, mean_free_distance
from forcenet.relax import OptimizerName, final_structure, relax_structures
from forcenet.tables import long_table, write_table

#: FbT-oracle: an ML-relaxed structure counts as relaxed if the oracle's max |F| on free
#: atoms is below this (eV/Å), OC20's force-below-threshold criterion.
FBT_THRESHOLD = 0.05
#: Systems whose oracle energy along the ML trajectory is plotted, per split.
PLOT_SYSTEMS = 3


def oracle_check(atoms: Atoms) -> tuple[float, float]:
    """EMT (the oracle) at ``atoms``: (max |F| over free atoms in eV/Å, total energy in eV)."""
    work = atoms.copy()
    work.calc = EMT()
    forces = work.get_forces(apply_constraint=False)  # [N, 3]
    free = ~fixed_mask(atoms)
    fmax = float(np.linalg.norm(forces[free], axis=1).max()) if free.any() else 0.0
    return fmax, float(work.get_potential_energy())


def _read_images(path: Path) -> list[Atoms]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IS2RS file not found (run the data generation stage)")
    if path.stat().st_size == 0:
        return []
    # index=":" always gives a list; ase's hint is Atoms | list[Atoms]
    return cast(list[Atoms], read(str(path), index=":", format="extxyz"))


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


def score_systems(
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
        free = ~fixed_mask(init)
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
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


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

    Writes its own folder ``out_dir``: ``trajectories/<split>/<sid>.traj``,
    ``relax_systems.parquet`` (one row per system, :func:`score_systems`) and
    ``relax_oracle_energy.png`` (:func:`plot_oracle_energy`). Returns the aggregate table
    (:func:`aggregate_relaxations`, one row per model and split; splits without IS2RS
    systems are left out); the caller turns it into the long metrics table with
    :func:`metrics_long_table` and writes that where it wants.
    """
    calc = ForceNetCalculator.from_checkpoint(Path(checkpoint), device=device)
    out_dir = Path(out_dir)
    scored = []
    start = time.perf_counter()
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
        scored.append(score_systems(calc.model_name, split, table, initial, relaxed, where))
        done = scored[-1]
        print(
            f"relax {calc.model_name}: {split}, {len(done)} systems, "
            f"{int(table['steps'].sum())} model steps, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        start = time.perf_counter()
    if not scored:
        raise ValueError(f"{is2rs_dir}: no IS2RS systems for splits {list(splits)}")
    systems = pd.concat(scored, ignore_index=True)
    plot_oracle_energy(systems, out_dir / "relax_oracle_energy.png")
    write_table(systems, out_dir / "relax_systems.parquet")
    return aggregate_relaxations(systems)
