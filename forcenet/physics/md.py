"""NVE molecular dynamics judged by the oracle: does following a model's forces conserve
the *true* (EMT) energy, and how long does the structure stay physical?

A direct-force model (ForceNet, GNS) has forces that need not be the gradient of any
energy, so Velocity Verlet driven by them may heat or cool the system; an energy model
(SchNet, DimeNet++) conserves its *own* energy, but not necessarily the oracle's. Each
run here is ASE's :class:`~ase.md.verlet.VelocityVerlet` from one structure (``FixAtoms``
atoms never move, OC20 tags 0/1 slab, 2 adsorbate) with a *driver* calculator (a
:class:`~forcenet.calculator.ForceNetCalculator`, or EMT itself: the reference, whose
drift is the integrator's alone, ≈ 0 at 0.5 fs). Every ``interval`` steps it records

* the oracle's total energy: EMT potential energy of the current positions + kinetic
  energy of the free atoms (fixed atoms have zero velocity);
* the driver's own total energy where it has an energy (energy models; NaN for
  force-only models, whose calculator raises ``ForcesOnlyError``);
* the kinetic energy and temperature ``2 K / (3 n_free k_B)``.

Per run (:func:`run_nve`): *drift*, the slope of a straight-line fit of the oracle total
energy against time divided by the number of free atoms (eV/atom/ps); *fluctuation*, the
standard deviation of the oracle total energy about that line per free atom (eV/atom); the
model's own drift; and *stability*, the time (ps) of the first unphysical event
(:data:`EVENT_KINDS`, checked every step), after which the run stops, so drift is measured
on the stable part only (``inf`` and ``event=None`` when the whole run was stable).
Summary columns: ``model, name, natoms, n_free, temperature_K, timestep_fs, steps,
steps_done, time_ps`` (last stable sample), ``drift_eV_atom_ps, fluctuation_eV_atom,
model_drift_eV_atom_ps, mean_temperature_K, stable, event, event_time_ps, wall_s``.

Measured reference (EMT driving itself, the 10 relaxed IS2RS validation systems, 13-20
free atoms, 450 K, 0.5 fs, 400 steps = 0.2 ps): |drift| <= 1.8e-5 eV/atom/ps, fluctuation
<= 3.7e-5 eV/atom; at 1 fs the fluctuation of the *H system grows to 1.3e-4. Very short
runs (< 0.1 ps) fit part of an oscillation, so their drift is noisier.

Velocities: Maxwell–Boltzmann at ``temperature_K`` on free atoms, seeded per structure
(``numpy.random.default_rng([seed, index])``, the same for every driver), total momentum
of the free atoms removed, then rescaled so that the starting temperature is exactly
``temperature_K``. From a relaxed structure about half of it flows into potential energy
(equipartition), so the run's mean temperature is typically ~T/2.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from ase import Atoms, units
from ase.calculators.calculator import Calculator, PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.calculators.emt import parameters as EMT_PARAMETERS
from ase.constraints import FixAtoms
from ase.data import covalent_radii
from ase.geometry import get_distances
from ase.md.verlet import VelocityVerlet
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from forcenet.atomic import atomic_write
from forcenet.data.frame import check_atoms_geometry, fixed_mask
from forcenet.tables import long_table, write_table

if TYPE_CHECKING:
    from matplotlib.lines import Line2D

#: The unphysical events that end a run (checked after every step, and at the start):
#: ``non_finite`` (NaN/inf positions or driver forces), ``close_contact`` (two atoms closer
#: than ``min_distance``), ``max_force`` (|F| of a free atom from the driver above
#: ``max_force``), ``oracle_max_force`` (the same for the oracle's forces, at the sampled
#: steps), ``desorbed`` (a piece of the adsorbate, tag 2, whose every atom is farther
#: than ``desorb_distance`` from every slab atom, tags 0/1, minimum image: a lone H
#: flying off or the whole molecule leaving; skipped when there is no adsorbate or slab).
#: Pieces are atoms linked by bonds shorter than :data:`BOND_FACTOR` times the sum of
#: their covalent radii: judged per atom, the top H of a bound *CH2OH (~4 Å above the
#: surface) would count as desorbed.
EventKind = Literal["non_finite", "close_contact", "max_force", "oracle_max_force", "desorbed"]
EVENT_KINDS: tuple[EventKind, ...] = (
    "non_finite",
    "close_contact",
    "max_force",
    "oracle_max_force",
    "desorbed",
)
#: Two adsorbate atoms are bonded (one piece) when closer than this times the sum of their
#: covalent radii.
BOND_FACTOR = 1.3
#: The model name of the oracle's own NVE runs.
ORACLE = "oracle"
SERIES_COLUMNS = [
    "model",
    "name",
    "n_free",
    "step",
    "time_ps",
    "oracle_potential_eV",
    "oracle_total_eV",
    "model_total_eV",
    "kinetic_eV",
    "temperature_K",
]


@dataclass(frozen=True)
class NVESettings:
    """One NVE run's settings.

    Args:
        temperature_K: starting temperature of the free atoms (K).
        timestep_fs: Velocity Verlet time step (fs); 0.5 keeps EMT's drift ~1e-5
            eV/atom/ps with H adsorbates, where 2 fs already drifts ~1e-3.
        steps: MD steps per run.
        interval: steps between recorded samples (the oracle is evaluated there).
        seed: velocity seed (combined with the structure's index).
        min_distance: ``close_contact`` below this interatomic distance (Å).
        max_force: ``max_force`` / ``oracle_max_force`` above this |F| (eV/Å).
        desorb_distance: ``desorbed`` when a piece of the adsorbate is farther than this
            from every slab atom (Å).
    """

    temperature_K: float = 450.0
    timestep_fs: float = 0.5
    steps: int = 400
    interval: int = 10
    seed: int = 0
    min_distance: float = 0.6
    max_force: float = 20.0
    desorb_distance: float = 4.0

    def __post_init__(self) -> None:
        if not self.temperature_K >= 0:
            raise ValueError(f"temperature must be >= 0 K, got {self.temperature_K}")
        if not self.timestep_fs > 0:
            raise ValueError(f"timestep must be > 0 fs, got {self.timestep_fs}")
        if self.steps < 1 or self.interval < 1:
            raise ValueError(f"steps and interval must be >= 1, got {self.steps}, {self.interval}")


def check_structure(atoms: Atoms, where: str) -> None:
    """A one-line ``ValueError`` (naming ``where``) unless EMT and this module can run it."""
    check_atoms_geometry(atoms, where)
    unsupported = sorted(set(atoms.get_chemical_symbols()) - set(EMT_PARAMETERS))
    if unsupported:
        raise ValueError(
            f"{where}: elements {unsupported} are not supported by the oracle EMT "
            f"(it has {sorted(EMT_PARAMETERS)})"
        )
    others = [type(c).__name__ for c in atoms.constraints if not isinstance(c, FixAtoms)]
    if others:
        raise ValueError(f"{where}: only FixAtoms constraints are supported, found {others}")
    if fixed_mask(atoms).all():
        raise ValueError(f"{where}: no free atoms (every atom is held by FixAtoms)")


def thermal_momenta(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> np.ndarray:
    """[N, 3] Maxwell–Boltzmann momenta (ASE units) on free atoms, zero on fixed ones.

    The free atoms' total momentum is removed (when there are two or more), then the
    momenta are rescaled to a kinetic temperature of exactly ``temperature_K``.
    """
    free = ~fixed_mask(atoms)
    masses = atoms.get_masses()[free, None]  # [F, 1] amu
    p_free = rng.standard_normal((int(free.sum()), 3)) * np.sqrt(masses * units.kB * temperature_K)
    if len(p_free) > 1:
        p_free -= masses * p_free.sum(axis=0) / masses.sum()
    kinetic = 0.5 * float((p_free**2 / masses).sum())
    if kinetic > 0:
        target = 1.5 * len(p_free) * units.kB * temperature_K
        p_free *= np.sqrt(target / kinetic)
    momenta = np.zeros((len(atoms), 3))
    momenta[free] = p_free
    return momenta


def find_event(atoms: Atoms, forces: np.ndarray, settings: NVESettings) -> EventKind | None:
    """The first unphysical event of :data:`EVENT_KINDS` at ``atoms`` (None if physical).

    ``forces`` [N, 3] are the driver's (fixed atoms are ignored).
    """
    free = ~fixed_mask(atoms)
    if not (np.isfinite(atoms.positions).all() and np.isfinite(forces).all()):
        return "non_finite"
    # minimum-image distances of all pairs: O(N^2), faster than a neighbor list up to
    # ~100 atoms (0.3 ms at 29 atoms)
    _, dist = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)  # [N, N] Å
    np.fill_diagonal(dist, np.inf)
    if dist.min() < settings.min_distance:
        return "close_contact"
    if np.linalg.norm(forces[free], axis=1).max() > settings.max_force:
        return "max_force"
    if _desorbed(atoms, dist, settings.desorb_distance):
        return "desorbed"
    return None


def _desorbed(atoms: Atoms, dist: np.ndarray, distance: float) -> bool:
    """True when a piece of the adsorbate is farther than ``distance`` from the slab;
    ``dist`` [N, N] are the minimum-image distances (Å)."""
    tags = atoms.get_tags()
    ads, slab = tags == 2, tags != 2
    if not (ads.any() and slab.any()):
        return False
    nearest = dist[np.ix_(ads, slab)].min(axis=1)  # [A] Å to the closest slab atom
    if nearest.max() <= distance:
        return False
    radii = covalent_radii[atoms.numbers[ads]]  # [A]
    bonded = dist[np.ix_(ads, ads)] < BOND_FACTOR * (radii[:, None] + radii[None, :])
    _, piece = connected_components(csr_matrix(bonded), directed=False)  # [A] labels
    closest = np.full(piece.max() + 1, np.inf)
    np.minimum.at(closest, piece, nearest)  # [pieces] each piece's closest approach
    return bool(closest.max() > distance)


def fit_drift(time_ps: np.ndarray, energy: np.ndarray, n_free: int) -> tuple[float, float]:
    """(slope of a straight-line fit in eV/atom/ps, std about it in eV/atom) of ``energy``
    (eV) against ``time_ps``, per free atom; NaN with fewer than 3 finite samples."""
    ok = np.isfinite(energy)
    if ok.sum() < 3:
        return float("nan"), float("nan")
    per_atom = energy[ok] / n_free
    slope, intercept = np.polyfit(time_ps[ok], per_atom, 1)
    residual = per_atom - (slope * time_ps[ok] + intercept)
    return float(slope), float(residual.std())


def _model_energy(driver: Calculator, atoms: Atoms) -> float:
    """The driver's potential energy at ``atoms``; NaN when it has none (force-only model,
    or a ForceNetCalculator's 0.0 stand-in, which is not an energy)."""
    if getattr(driver, "energy_mode", None) == "zero":
        return float("nan")
    try:
        return float(driver.get_potential_energy(atoms))
    except PropertyNotImplementedError:  # ForcesOnlyError is one
        return float("nan")


@dataclass
class _Trajectory:
    """The samples of one run and its oracle, accumulated while it steps."""

    atoms: Atoms
    driver: Calculator
    oracle: Atoms  # a copy of the structure with an EMT calculator, moved along
    n_free: int
    rows: list[dict[str, float]]

    def sample(self, step: int, settings: NVESettings) -> EventKind | None:
        """Record step ``step``; ``oracle_max_force`` when the oracle's forces are unphysical."""
        self.oracle.positions = self.atoms.positions
        potential = float(self.oracle.get_potential_energy())
        kinetic = float(self.atoms.get_kinetic_energy())
        oracle_forces = self.oracle.get_forces()  # [N, 3], FixAtoms applied
        if np.linalg.norm(oracle_forces, axis=1).max() > settings.max_force:
            return "oracle_max_force"
        model = _model_energy(self.driver, self.atoms)
        self.rows.append(
            {
                "step": step,
                "time_ps": step * settings.timestep_fs / 1000.0,
                "oracle_potential_eV": potential,
                "oracle_total_eV": potential + kinetic,
                "model_total_eV": model + kinetic,
                "kinetic_eV": kinetic,
                "temperature_K": 2.0 * kinetic / (3.0 * self.n_free * units.kB),
            }
        )
        return None


def _integrate(run: _Trajectory, settings: NVESettings) -> tuple[int, EventKind | None]:
    """Step ``run`` until ``settings.steps`` or the first event: (steps done, event)."""
    dyn = VelocityVerlet(run.atoms, timestep=settings.timestep_fs * units.fs, logfile=None)
    forces = run.atoms.get_forces()  # [N, 3], FixAtoms applied
    for step in range(settings.steps + 1):
        if step > 0:
            forces = dyn.step(forces)
        event = find_event(run.atoms, forces, settings)
        if event is None and (step % settings.interval == 0 or step == settings.steps):
            event = run.sample(step, settings)
        if event is not None:
            return step, event
    return settings.steps, None


def run_nve(
    atoms: Atoms,
    driver: Calculator,
    settings: NVESettings,
    *,
    index: int = 0,
    model: str = "model",
    name: str = "0",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """One NVE run of ``atoms`` (not modified) driven by ``driver``, judged by EMT.

    ``index`` is the structure's position in its list (it seeds the velocities with
    ``settings.seed``, so every driver starts structure ``index`` identically); ``model``
    and ``name`` label the rows. Returns (summary row, time series of
    :data:`SERIES_COLUMNS`); see the module docstring for the quantities.
    """
    check_structure(atoms, f"structure {name}")
    work = atoms.copy()
    work.calc = driver
    rng = np.random.default_rng([settings.seed, index])
    work.set_momenta(thermal_momenta(work, settings.temperature_K, rng), apply_constraint=False)
    oracle = atoms.copy()
    oracle.calc = EMT()
    n_free = int((~fixed_mask(atoms)).sum())
    run = _Trajectory(atoms=work, driver=driver, oracle=oracle, n_free=n_free, rows=[])
    start = time.perf_counter()
    steps_done, event = _integrate(run, settings)
    wall = time.perf_counter() - start
    dtypes = {"step": "int64", **{c: "float64" for c in SERIES_COLUMNS[4:]}}
    series = pd.DataFrame(run.rows, columns=SERIES_COLUMNS[3:]).astype(dtypes)
    series.insert(0, "n_free", n_free)
    series.insert(0, "name", name)
    series.insert(0, "model", model)
    t = series["time_ps"].to_numpy()
    drift, fluctuation = fit_drift(t, series["oracle_total_eV"].to_numpy(), n_free)
    model_drift, _ = fit_drift(t, series["model_total_eV"].to_numpy(), n_free)
    summary = {
        "model": model,
        "name": name,
        "natoms": len(atoms),
        "n_free": n_free,
        "temperature_K": settings.temperature_K,
        "timestep_fs": settings.timestep_fs,
        "steps": settings.steps,
        "steps_done": steps_done,
        "time_ps": float(t[-1]) if len(t) else 0.0,
        "drift_eV_atom_ps": drift,
        "fluctuation_eV_atom": fluctuation,
        "model_drift_eV_atom_ps": model_drift,
        "mean_temperature_K": float(series["temperature_K"].mean()),
        "stable": event is None,
        "event": event,
        "event_time_ps": float("inf") if event is None else steps_done * settings.timestep_fs / 1e3,
        "wall_s": wall,
    }
    return summary, series


def run_models(
    drivers: Mapping[str, Calculator],
    structures: list[Atoms],
    names: list[str],
    settings: NVESettings,
    *,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`run_nve` of every structure with every driver (``{model name: calculator}``;
    :func:`oracle_driver` for the reference): (summary, series) tables, in that order."""
    for k, (atoms, name) in enumerate(zip(structures, names, strict=True)):
        check_structure(atoms, f"structure {name} (#{k})")
    rows, parts = [], []
    for model, driver in drivers.items():
        for k, (atoms, name) in enumerate(zip(structures, names, strict=True)):
            summary, series = run_nve(atoms, driver, settings, index=k, model=model, name=name)
            rows.append(summary)
            parts.append(series)
            if progress:
                print(
                    f"md {model} {name}: {summary['steps_done']} steps, "
                    f"drift {summary['drift_eV_atom_ps']:.2e} eV/atom/ps, "
                    f"event {summary['event']}, {summary['wall_s']:.1f} s",
                    flush=True,
                )
    return pd.DataFrame(rows), pd.concat(parts, ignore_index=True)


def oracle_driver() -> Calculator:
    """EMT as the driver: the oracle's own NVE run, the reference."""
    return EMT()


def plot_md_energy(series: pd.DataFrame, path: Path) -> None:
    """PNG: oracle total energy per free atom minus its start value against time, one
    panel per model, one line per structure (dotted: the model's own total energy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(series["model"]))
    cols = min(max(len(models), 1), 3)
    rows = math.ceil(max(len(models), 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    # one colour per structure in every panel, and one legend for the whole figure
    colours = {str(n): f"C{k % 10}" for k, n in enumerate(dict.fromkeys(series["name"]))}
    handles: dict[str, Line2D] = {}
    for ax, model in zip(axes.flat, models, strict=False):
        for name, part in series[series.model == model].groupby("name", sort=False):
            color = colours[str(name)]
            for column, style in (("oracle_total_eV", "-"), ("model_total_eV", ":")):
                energy = part[column].to_numpy() / part["n_free"].to_numpy()
                if np.isfinite(energy).any():
                    ax.plot(part.time_ps, energy - energy[0], style, color=color, label=None)
            handles.setdefault(str(name), ax.plot([], [], "-", color=color)[0])
        ax.set(title=f"{model}: NVE", xlabel="time (ps)", ylabel="ΔE_total / free atom (eV)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.legend(
        list(handles.values()),
        list(handles),
        title="solid: EMT energy, dotted: the model's own",
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncols=min(len(handles), 4) or 1,
        fontsize="small",
        title_fontsize="small",
    )
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- files

#: The split of the MD rows in the long table (and of their ``md/...`` MLflow keys).
MD_SPLIT = "md"
#: The files an MD run writes into its folder (the report reads the series).
MD_SUMMARY = "md_summary.parquet"
MD_SERIES = "md_series.parquet"
MD_PLOT = "md_energy.png"


#: Columns of a run's summary that are wall-clock figures, not results.
CLOCK_COLUMNS = ("wall_s",)


def md_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The aggregates of one driver's runs (rows of :func:`run_nve`).

    ``drift_mean`` / ``drift_abs_mean`` / ``drift_abs_max``: the oracle total energy's
    drift (eV/atom/ps; mean signed, mean and largest magnitude), ``fluctuation_mean``
    (eV/atom) about its fit, ``model_drift_abs_mean`` the model's own energy (NaN without
    one), ``stable_fraction`` of runs without an unphysical event, ``first_event_ps`` the
    earliest event (inf when every run was stable) and ``events_<kind>`` the runs ended by
    each kind of :data:`EVENT_KINDS`; plus the settings and counts
    (results only: no wall time).
    """
    drift = summary["drift_eV_atom_ps"].astype(float)
    metrics = {
        "runs": float(len(summary)),
        "steps": float(summary["steps"].max()),
        "timestep_fs": float(summary["timestep_fs"].max()),
        "temperature_K": float(summary["temperature_K"].max()),
        "simulated_ps": float(summary["time_ps"].sum()),
        "drift_mean": float(drift.mean()),
        "drift_abs_mean": float(drift.abs().mean()),
        "drift_abs_max": float(drift.abs().max()),
        "fluctuation_mean": float(summary["fluctuation_eV_atom"].mean()),
        "model_drift_abs_mean": float(summary["model_drift_eV_atom_ps"].abs().mean()),
        "mean_temperature_K": float(summary["mean_temperature_K"].mean()),
        "stable_fraction": float(summary["stable"].astype(float).mean()),
        "first_event_ps": float(summary["event_time_ps"].min()),
    }
    for kind in EVENT_KINDS:
        metrics[f"events_{kind}"] = float((summary["event"] == kind).sum())
    return metrics


def run_md(
    drivers: Mapping[str, Calculator],
    structures: list[Atoms],
    names: list[str],
    settings: NVESettings,
    out: Path,
    run_id: str | None = None,
    clock: dict[str, float] | None = None,
) -> pd.DataFrame:
    """NVE runs of every structure with every driver, their files in ``out``
    (:data:`MD_SUMMARY` without the wall times, :data:`MD_SERIES`, :data:`MD_PLOT`); the
    long table of their aggregates, one set per driver (split :data:`MD_SPLIT`).
    ``clock``: gets ``md_wall_s``, the seconds of all the runs."""
    summary, series = run_models(drivers, structures, names, settings, progress=True)
    if clock is not None:
        clock["md_wall_s"] = float(summary["wall_s"].sum())
    summary = summary.drop(
        columns=[c for c in CLOCK_COLUMNS if c in summary.columns]
    )  # results only
    write_table(summary, Path(out) / MD_SUMMARY)
    write_table(series, Path(out) / MD_SERIES)
    plot_md_energy(series, Path(out) / MD_PLOT)
    parts = [
        long_table(str(model), MD_SPLIT, md_metrics(rows), run_id)
        for model, rows in summary.groupby("model", sort=False)
    ]
    return pd.concat(parts, ignore_index=True)
