"""Scoring ML relaxations against the EMT oracle (OC20's IS2RS metrics, Chanussot et al. 2021).

:func:`evaluate_relaxations` relaxes the IS2RS initial structures written by the data
generator (``<is2rs_dir>/<split>_initial.extxyz``) with :func:`forcenet.relax.relax_structures`
and compares the results with the oracle's relaxed structures (``<split>_relaxed.extxyz``,
same order, ``info["sid"]``): ADwT (OC20's average distance within threshold,
:func:`forcenet.metrics.adwt`), FbT-oracle (fraction of ML-relaxed structures whose *EMT*
max force on free atoms is below 0.05 eV/Å) and the EMT energy of the ML result minus the
oracle's own minimum. :func:`metrics_long_table` gives the aggregates in the long form of
the evaluation tables. Every run records its ML step limit (``ml_steps_limit``: OC20's
protocol is 200 LBFGS steps).

Hybrid relaxations (``hybrid=True``), the protocol practitioners use: the model
pre-relaxes from the initial structure, then the oracle (EMT, LBFGS with the settings of
:data:`forcenet.relax.LBFGS_SETTINGS`) finishes from the ML result to ``oracle_fmax``
(:func:`hybrid_systems`). It is compared with an oracle-only relaxation from the same
initial structure with the same optimizer, target and step limit, run once per system:
oracle steps saved (%), whether the hybrid reaches the same minimum (oracle energy within
:data:`SAME_MINIMUM_ENERGY` of the oracle-only one) and the ADwT of the hybrid result
against the oracle-only structure. The aggregates then also have a row over all splits
(split :data:`OVERALL_SPLIT`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
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
from forcenet.relax import OptimizerName, final_structure, make_optimizer, relax_structures
from forcenet.tables import long_table, write_table

#: FbT-oracle: an ML-relaxed structure counts as relaxed if the oracle's max |F| on free
#: atoms is below this (eV/Å), OC20's force-below-threshold criterion.
FBT_THRESHOLD = 0.05
#: Systems whose oracle energy along the ML trajectory is plotted, per split.
PLOT_SYSTEMS = 3
#: Hybrid relaxations: the oracle's target max |F| on free atoms (eV/Å) and its step limit.
HYBRID_FMAX = 0.05
ORACLE_STEPS = 400
#: A hybrid result is at the same minimum if its oracle energy is within this (eV, strict)
#: of the oracle-only relaxation's (OC20's energy threshold).
SAME_MINIMUM_ENERGY = 0.02
#: The split name of the aggregate row over all splits (hybrid runs only).
OVERALL_SPLIT = "overall"


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
    """Per-system ADwT distance, oracle max force and oracle energy gap of the ML results
    (results only: the relaxation's wall time stays in ``table``, so that a rerun writes
    the same file)."""
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


@dataclass(frozen=True)
class OracleRelaxation:
    """One oracle (EMT) relaxation: its final structure, steps and convergence."""

    atoms: Atoms  # final structure (cell, tags and FixAtoms of the start)
    steps: int  # LBFGS steps taken; the oracle was evaluated steps + 1 times
    converged: bool  # oracle max |F| on free atoms < fmax at the end
    fmax: float  # final oracle max |F| on free atoms (eV/Å)
    energy: float  # final oracle energy (eV)
    trajectory: Path  # every evaluated state, with oracle energy and forces


def oracle_relax(atoms: Atoms, *, fmax: float, steps: int, trajectory: Path) -> OracleRelaxation:
    """Relax a copy of ``atoms`` with EMT and LBFGS (OCP settings) to max |F| < ``fmax``.

    At most ``steps`` optimizer steps; ``FixAtoms`` atoms stay put. The trajectory is
    written atomically to ``trajectory``.
    """
    work = atoms.copy()
    work.calc = EMT()
    with atomic_write(trajectory) as tmp, Trajectory(str(tmp), "w", work) as traj:
        opt = make_optimizer("lbfgs", work)
        opt.attach(traj)  # every evaluated state, the start included
        opt.run(fmax=fmax, steps=steps)
    final_fmax, energy = oracle_check(work)
    final = work.copy()  # without the live EMT calculator
    return OracleRelaxation(
        atoms=final,
        steps=int(opt.nsteps),
        converged=final_fmax < fmax,
        fmax=final_fmax,
        energy=energy,
        trajectory=Path(trajectory),
    )


def hybrid_scores(
    initial: Atoms, alone: OracleRelaxation, finish: OracleRelaxation
) -> dict[str, object]:
    """Hybrid (``finish``, from the ML result) against oracle-only (``alone``) for one system.

    ``hybrid_steps_saved_pct`` = 100 (1 − hybrid oracle steps / oracle-only steps), NaN
    when the oracle-only run took no step; negative when the hybrid needs more.
    """
    free = ~fixed_mask(initial)
    ref = alone.atoms
    delta_e = finish.energy - alone.energy
    saved = 100.0 * (1.0 - finish.steps / alone.steps) if alone.steps else float("nan")
    return {
        "oracle_only_steps": alone.steps,
        "oracle_only_converged": alone.converged,
        "oracle_only_fmax": alone.fmax,
        "oracle_only_energy": alone.energy,
        "hybrid_oracle_steps": finish.steps,
        "hybrid_converged": finish.converged,
        "hybrid_fmax": finish.fmax,
        "hybrid_energy": finish.energy,
        "hybrid_steps_saved_pct": saved,
        "hybrid_delta_e": delta_e,
        "hybrid_same_minimum": abs(delta_e) < SAME_MINIMUM_ENERGY,
        "hybrid_distance": mean_free_distance(
            finish.atoms.positions, ref.positions, ref.cell, ref.pbc, free
        ),
        "hybrid_adwt": adwt(finish.atoms.positions, ref.positions, ref.cell, ref.pbc, free),
        "oracle_only_trajectory": str(alone.trajectory),
        "hybrid_trajectory": str(finish.trajectory),
    }


def hybrid_systems(
    table: pd.DataFrame,
    initial: Sequence[Atoms],
    *,
    fmax: float = HYBRID_FMAX,
    steps: int = ORACLE_STEPS,
    traj_dir: Path,
) -> pd.DataFrame:
    """Oracle-only and hybrid relaxations of the systems of one ML run, one row each.

    ``table`` is :func:`forcenet.relax.relax_structures`'s result for ``initial`` (same
    order). Per system the oracle relaxes once from the initial structure
    (``traj_dir/oracle_only/<name>.traj``) and once from the ML-relaxed structure
    (``traj_dir/hybrid/<name>.traj``), both with the same ``fmax`` (eV/Å) and at most
    ``steps`` LBFGS steps; columns as in :func:`hybrid_scores`, plus
    ``oracle_steps_limit``.
    """
    if steps < 0 or not fmax > 0:
        raise ValueError(f"hybrid relaxations need steps >= 0 and fmax > 0; got {steps}, {fmax}")
    traj_dir = Path(traj_dir)
    rows = []
    for run, init in zip(table.itertuples(), initial, strict=True):
        name = str(run.name)
        alone = oracle_relax(
            init, fmax=fmax, steps=steps, trajectory=traj_dir / "oracle_only" / f"{name}.traj"
        )
        start = init.copy()  # the ML positions with the initial cell, tags and constraints
        start.positions = final_structure(Path(run.trajectory)).positions
        finish = oracle_relax(
            start, fmax=fmax, steps=steps, trajectory=traj_dir / "hybrid" / f"{name}.traj"
        )
        rows.append({"oracle_steps_limit": steps, **hybrid_scores(init, alone, finish)})
    return pd.DataFrame(rows)


#: Aggregates of every run: column -> (per-system column, reduction).
_AGGREGATES = {
    "relax_systems": ("sid", "size"),
    "adwt": ("adwt", "mean"),
    "relax_mean_distance": ("distance", "mean"),
    "fbt_oracle": ("fbt", "mean"),
    "oracle_delta_e_mean": ("oracle_delta_e", "mean"),
    "oracle_delta_e_median": ("oracle_delta_e", "median"),
    "relax_converged_fraction": ("converged", "mean"),
    "relax_mean_steps": ("steps", "mean"),
}
#: Aggregates of hybrid runs (NaN steps saved, from systems the oracle-only run did not
#: move, are left out of the mean and median).
_HYBRID_AGGREGATES = {
    "hybrid_steps_saved_pct": ("hybrid_steps_saved_pct", "mean"),
    "hybrid_steps_saved_pct_median": ("hybrid_steps_saved_pct", "median"),
    "hybrid_same_minimum": ("hybrid_same_minimum", "mean"),
    "hybrid_adwt": ("hybrid_adwt", "mean"),
    "hybrid_mean_distance": ("hybrid_distance", "mean"),
    "hybrid_delta_e_median": ("hybrid_delta_e", "median"),
    "hybrid_oracle_mean_steps": ("hybrid_oracle_steps", "mean"),
    "oracle_only_mean_steps": ("oracle_only_steps", "mean"),
    "hybrid_converged_fraction": ("hybrid_converged", "mean"),
    "oracle_only_converged_fraction": ("oracle_only_converged", "mean"),
    "oracle_steps_limit": ("oracle_steps_limit", "max"),
}


def aggregate_relaxations(systems: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, split): ADwT, FbT-oracle, oracle ΔE (eV), convergence, steps.

    ``adwt`` is the mean of the per-system values (= OC20's ADwT), ``fbt_oracle`` the
    fraction of systems with oracle max |F| < :data:`FBT_THRESHOLD`; ``ml_steps_limit``
    the ML step limit, when ``systems`` records it. When ``systems`` has the columns of
    :func:`hybrid_systems`, also the hybrid aggregates (``hybrid_steps_saved_pct`` mean
    and ``_median``, ``hybrid_same_minimum`` fraction, ``hybrid_adwt``, ...;
    ``hybrid_steps_saved_total_pct`` = 100 (1 − Σ hybrid steps / Σ oracle-only steps), the
    oracle work saved over all systems) and one more row per model over all splits
    (split :data:`OVERALL_SPLIT`).
    """
    spec = dict(_AGGREGATES)
    if "ml_steps_limit" in systems.columns:
        spec["ml_steps_limit"] = ("ml_steps_limit", "max")
    hybrid = "hybrid_steps_saved_pct" in systems.columns
    if hybrid:
        spec.update(_HYBRID_AGGREGATES)
        systems = pd.concat([systems, systems.assign(split=OVERALL_SPLIT)], ignore_index=True)
    grouped = systems.groupby(["model", "split"], sort=False)
    table = grouped.agg(**spec)
    if hybrid:
        sums = grouped[["hybrid_oracle_steps", "oracle_only_steps"]].sum()
        ratio = sums["hybrid_oracle_steps"] / sums["oracle_only_steps"].where(lambda n: n > 0)
        table["hybrid_steps_saved_total_pct"] = 100.0 * (1.0 - ratio)
    return table.reset_index()


def metrics_long_table(aggregate: pd.DataFrame, run_id: str | None = None) -> pd.DataFrame:
    """The aggregate in the long ``model, split, metric, value, run_id`` form of evaluate."""
    parts = []
    for row in aggregate.to_dict("records"):
        metrics = {k: float(v) for k, v in row.items() if k not in ("model", "split")}
        parts.append(long_table(row["model"], row["split"], metrics, run_id))
    return pd.concat(parts, ignore_index=True)


def _energy_axis(ax, energies: np.ndarray) -> None:
    """A symmetric-log y axis (linear within 0.01 eV) with plain labels at 1, 2 and 5 per
    decade where the energies span more than a decade; linear where they do not (a log
    axis inside one decade may show no label at all)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, SymmetricalLogLocator

    size = np.abs(np.asarray(energies, dtype=float))
    size = size[np.isfinite(size)]
    if len(size) == 0 or size.max() <= 10 * max(size.min(), 1e-2):
        return
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1e-2, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


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
    cols = min(max(len(splits), 1), 2)
    rows = -(-max(len(splits), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    for ax in list(axes.flat)[len(splits) :]:
        ax.set_visible(False)
    for ax, split in zip(axes.flat, splits, strict=False):
        for row in systems[systems.split == split].head(per_split).itertuples():
            with Trajectory(row.trajectory) as traj:
                picks = np.unique(
                    np.linspace(0, len(traj) - 1, min(len(traj), max_frames)).round().astype(int)
                )
                energies = [oracle_check(traj[int(i)])[1] - row.oracle_min_energy for i in picks]
            ax.plot(picks, energies, marker=".", label=f"sid {row.sid}")
        _energy_axis(ax, np.concatenate([line.get_ydata() for line in ax.get_lines()]))
        ax.set(
            title=f"{systems.model.iloc[0]} · {split}",
            xlabel="ML relaxation step",
            ylabel="E_EMT − E_EMT,min (eV)",
        )
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def _progress(model: str, split: str, systems: pd.DataFrame, seconds: float) -> str:
    """The progress line of one split (the oracle's steps too in hybrid runs)."""
    line = f"relax {model}: {split}, {len(systems)} systems, "
    line += f"{int(systems['steps'].sum())} model steps, "
    if "hybrid_oracle_steps" in systems.columns:
        line += (
            f"{int(systems['hybrid_oracle_steps'].sum())} hybrid oracle steps vs "
            f"{int(systems['oracle_only_steps'].sum())} oracle-only, "
        )
    return line + f"{seconds:.0f} s"


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
    hybrid: bool = False,
    oracle_fmax: float = HYBRID_FMAX,
    oracle_steps: int = ORACLE_STEPS,
) -> pd.DataFrame:
    """ML-relax the IS2RS initial structures of ``splits`` and score them against EMT.

    ``steps`` is the ML step limit (OC20: 200 LBFGS steps, with ``fmax`` 0 all of them),
    recorded as ``ml_steps_limit``. Writes its own folder ``out_dir``:
    ``trajectories/<split>/<sid>.traj``, ``relax_systems.parquet`` (one row per system,
    :func:`score_systems`) and ``relax_oracle_energy.png`` (:func:`plot_oracle_energy`).
    With ``hybrid``, each system is also relaxed by the oracle from its initial and from
    its ML-relaxed structure to ``oracle_fmax`` in at most ``oracle_steps`` steps
    (:func:`hybrid_systems`, trajectories in ``oracle/<split>/``), and the systems table
    and aggregates get the hybrid columns. Returns the aggregate table
    (:func:`aggregate_relaxations`, one row per model and split; splits without IS2RS
    systems are left out); the caller turns it into the long metrics table with
    :func:`metrics_long_table` and writes that where it wants.
    """
    if hybrid and (oracle_steps < 0 or not oracle_fmax > 0):
        raise ValueError(
            f"hybrid relaxations need oracle_steps >= 0 and oracle_fmax > 0; "
            f"got {oracle_steps}, {oracle_fmax}"
        )
    calc = ForceNetCalculator.from_checkpoint(Path(checkpoint), device=device)
    out_dir = Path(out_dir)
    scored = []
    for split in splits:
        start = time.perf_counter()
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
        done = score_systems(calc.model_name, split, table, initial, relaxed, where)
        done.insert(done.columns.get_loc("steps") + 1, "ml_steps_limit", steps)
        if hybrid:
            extra = hybrid_systems(
                table,
                initial,
                fmax=oracle_fmax,
                steps=oracle_steps,
                traj_dir=out_dir / "oracle" / split,
            )
            done = pd.concat([done, extra], axis=1)
        scored.append(done)
        print(_progress(calc.model_name, split, done, time.perf_counter() - start), flush=True)
    if not scored:
        raise ValueError(f"{is2rs_dir}: no IS2RS systems for splits {list(splits)}")
    systems = pd.concat(scored, ignore_index=True)
    plot_oracle_energy(systems, out_dir / "relax_oracle_energy.png")
    write_table(systems, out_dir / "relax_systems.parquet")
    return aggregate_relaxations(systems)
