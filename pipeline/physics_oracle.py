"""Stage ``physics_oracle``: the oracle's own NVE runs, the reference of stage ``physics``;
and what both stages share: the structures, the MD settings and the MD aggregates.

The structures are the IS2RS initial structures the data stage writes
(``IS2RS/<split>_initial.extxyz``) of ``physics.splits``, taken in turn from each split
(the first of every split, then the second, ...) and named ``<split>:<sid>``; MD runs on
the first ``physics.md.structures`` of them, with the same seeded start for every driver
(:func:`forcenet.physics.md.run_models`). EMT driving itself measures the integrator
alone: its drift is the floor a model's drift is read against.

Writes ``--out/md_summary.parquet`` (one row per run), ``md_series.parquet`` (the oracle
energy every ``interval`` steps) and ``md_energy.png``, the aggregates as a long table
(split ``md``, :func:`md_metrics`) and optionally as DVC metrics JSON: results only, the
seconds go to the ``--timing`` file (:mod:`pipeline.timing`).

    python -m pipeline.physics_oracle data/is2rs --out data/physics/oracle \\
        --table reports/physics/oracle.parquet --metrics-json reports/metrics/physics_oracle.json \\
        --timing reports/timing/physics_oracle.json
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pandas as pd

from forcenet.tables import long_table, write_metrics_json, write_table
from pipeline import stage
from pipeline.params import MDConfig, load_params
from pipeline.timing import CLOCK_COLUMNS, write_timing

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator

    from forcenet.physics.md import NVESettings

#: The split of the MD rows in the long table (and of their ``md/...`` MLflow keys).
MD_SPLIT = "md"
#: The files an MD run writes into its folder (the report reads the series).
MD_SUMMARY = "md_summary.parquet"
MD_SERIES = "md_series.parquet"
MD_PLOT = "md_energy.png"


def physics_structures(
    is2rs: Path, splits: Sequence[str], count: int
) -> tuple[list[Atoms], list[str]]:
    """The first ``count`` IS2RS initial structures of ``splits``, taken in turn from each
    split, named ``<split>:<sid>`` (fewer when the splits hold fewer); a missing file is a
    FileNotFoundError naming it, no structure at all a ValueError."""
    from ase.io import read

    per_split: list[list[tuple[Atoms, str]]] = []
    for split in splits:
        path = Path(is2rs) / f"{split}_initial.extxyz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: IS2RS file not found (run the data stage)")
        images = (
            cast(list, read(str(path), index=":", format="extxyz")) if path.stat().st_size else []
        )
        per_split.append([(a, f"{split}:{a.info.get('sid', k)}") for k, a in enumerate(images)])
    picked: list[tuple[Atoms, str]] = []
    for rank in range(max((len(s) for s in per_split), default=0)):
        picked += [s[rank] for s in per_split if rank < len(s)]
    picked = picked[:count]
    if not picked:
        raise ValueError(f"{is2rs}: no IS2RS initial structures for splits {list(splits)}")
    return [a for a, _ in picked], [n for _, n in picked]


def has_structures(is2rs: Path) -> bool:
    """Whether ``is2rs`` holds initial structures (the data sources other than the
    embedded one leave it empty: no oracle to check against), said in one line if not."""
    if any(Path(is2rs).glob("*_initial.extxyz")):
        return True
    print(f"physics: no IS2RS structures in {is2rs}; nothing to check")
    return False


def nve_settings(md: MDConfig) -> NVESettings:
    """``physics.md`` as the library's :class:`~forcenet.physics.md.NVESettings`."""
    from forcenet.physics.md import NVESettings

    return NVESettings(
        temperature_K=md.temperature_K,
        timestep_fs=md.timestep_fs,
        steps=md.steps,
        interval=md.interval,
        seed=md.seed,
    )


def md_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """The aggregates of one driver's runs (rows of :func:`forcenet.physics.md.run_nve`).

    ``drift_mean`` / ``drift_abs_mean`` / ``drift_abs_max``: the oracle total energy's
    drift (eV/atom/ps; mean signed, mean and largest magnitude), ``fluctuation_mean``
    (eV/atom) about its fit, ``model_drift_abs_mean`` the model's own energy (NaN without
    one), ``stable_fraction`` of runs without an unphysical event, ``first_event_ps`` the
    earliest event (inf when every run was stable) and ``events_<kind>`` the runs ended by
    each kind of :data:`forcenet.physics.md.EVENT_KINDS`; plus the settings and counts
    (results only: no wall time).
    """
    from forcenet.physics.md import EVENT_KINDS

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
    from forcenet.physics.md import plot_md_energy, run_models

    summary, series = run_models(drivers, structures, names, settings, progress=True)
    if clock is not None:
        clock["md_wall_s"] = float(summary["wall_s"].sum())
    summary = summary.drop(columns=[c for c in CLOCK_COLUMNS if c in summary.columns])
    write_table(summary, Path(out) / MD_SUMMARY)
    write_table(series, Path(out) / MD_SERIES)
    plot_md_energy(series, Path(out) / MD_PLOT)
    parts = [
        long_table(str(model), MD_SPLIT, md_metrics(rows), run_id)
        for model, rows in summary.groupby("model", sort=False)
    ]
    return pd.concat(parts, ignore_index=True)


def md_line(long: pd.DataFrame) -> str:
    """A one-line account of the MD rows of a long table, for the stage's last line."""
    m = long[long.split == MD_SPLIT].set_index("metric")["value"]
    first = m["first_event_ps"]
    events = "no event" if not math.isfinite(first) else f"first event at {first:.3f} ps"
    return (
        f"MD |drift| {m['drift_abs_mean']:.2e} eV/atom/ps, stable {m['stable_fraction']:.2f}, "
        f"{events}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    from forcenet.physics.md import ORACLE, oracle_driver

    p = stage.parser(__doc__)
    p.add_argument("is2rs", type=Path, help="folder of SPLIT_initial.extxyz")
    p.add_argument("--out", type=Path, required=True, help="MD summary, series and plot")
    p.add_argument("--table", type=Path, required=True, help="aggregates as a long table")
    p.add_argument("--metrics-json", type=Path, help="aggregates for DVC")
    p.add_argument("--timing", type=Path, help="timing file (seconds)")
    args = p.parse_args(argv)
    physics = load_params(args.params).physics
    if not has_structures(args.is2rs):
        return
    start = time.perf_counter()
    atoms, names = physics_structures(args.is2rs, physics.splits, physics.md.structures)
    settings = nve_settings(physics.md)
    clock: dict[str, float] = {}
    long = run_md({ORACLE: oracle_driver()}, atoms, names, settings, args.out, clock=clock)
    write_table(long, args.table)
    if args.metrics_json is not None:
        write_metrics_json(stage.dvc_metrics(long), args.metrics_json)
    if args.timing is not None:
        write_timing(args.timing, {**clock, "seconds": time.perf_counter() - start})
    print(f"physics {ORACLE}: {md_line(long)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    stage.run(main)
