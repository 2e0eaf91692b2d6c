"""``forcenet physics md`` (registered by :mod:`forcenet.physics.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from forcenet.cli_options import DeviceOpt

if TYPE_CHECKING:
    import pandas as pd
    from ase.calculators.calculator import Calculator

    from forcenet.physics.md import NVESettings

#: The columns the command prints (all of them are in summary.parquet).
SHOWN = [
    "model",
    "name",
    "n_free",
    "steps_done",
    "drift_eV_atom_ps",
    "fluctuation_eV_atom",
    "model_drift_eV_atom_ps",
    "mean_temperature_K",
    "event",
    "event_time_ps",
    "wall_s",
]


def md_command(
    checkpoint: str,
    inputs: list[Path],
    out_dir: Path,
    settings: NVESettings,
    *,
    structures: int | None = 3,
    oracle_reference: bool = True,
    device: str | None = None,
) -> pd.DataFrame:
    """Run the NVE check and write ``out_dir/summary.parquet``, ``series.parquet`` and
    ``md_energy.png``; returns the summary table. ``checkpoint`` ``"oracle"``: EMT alone."""
    from forcenet.calculator import ForceNetCalculator
    from forcenet.physics import md
    from forcenet.relax import read_structures
    from forcenet.tables import write_table

    images, names = read_structures(inputs)
    if not images:
        raise ValueError(f"no structures in {[str(p) for p in inputs]}")
    if structures is not None:
        if structures < 1:
            raise ValueError(f"--structures must be >= 1, got {structures}")
        images, names = images[:structures], names[:structures]
    drivers: dict[str, Calculator] = {}
    if checkpoint != md.ORACLE:
        calc = ForceNetCalculator.from_checkpoint(Path(checkpoint), device=device)
        drivers[calc.model_name] = calc
    if oracle_reference or checkpoint == md.ORACLE:
        drivers[md.ORACLE] = md.oracle_driver()
    summary, series = md.run_models(drivers, images, names, settings, progress=True)
    out_dir = Path(out_dir)
    write_table(summary, out_dir / "summary.parquet")
    write_table(series, out_dir / "series.parquet")
    md.plot_md_energy(series, out_dir / "md_energy.png")
    return summary


def md(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="A checkpoint written by `forcenet train`, or the word `oracle` to run "
            "EMT's own NVE reference alone."
        ),
    ],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="ASE-readable files of structures (FixAtoms = fixed, tags 0/1 slab, 2 "
            "adsorbate; e.g. data/is2rs/val_id_relaxed.extxyz). Elements: those of EMT."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for summary.parquet, series.parquet, md_energy.png.")
    ],
    temperature: Annotated[
        float, typer.Option(help="Starting temperature of the free atoms (K).")
    ] = 450.0,
    steps: Annotated[int, typer.Option(help="Velocity Verlet steps per structure.")] = 400,
    timestep_fs: Annotated[float, typer.Option(help="Time step (fs).")] = 0.5,
    interval: Annotated[
        int, typer.Option(help="Steps between samples (oracle energy, temperature).")
    ] = 10,
    structures: Annotated[int, typer.Option(help="Run the first N structures of the inputs.")] = 3,
    seed: Annotated[int, typer.Option(help="Velocity seed (same start for every model).")] = 0,
    oracle_reference: Annotated[
        bool, typer.Option(help="Also run the oracle (EMT) itself from the same start.")
    ] = True,
    device: DeviceOpt = None,
) -> None:
    """NVE molecular dynamics driven by the model, judged by the oracle (EMT).

    Per structure: drift of the oracle's total energy (EMT potential + kinetic, eV per
    free atom per ps, from a straight-line fit), its fluctuation about the fit, the
    model's own energy drift (energy models only), and the time to the first unphysical
    event (close contact < 0.6 Å, |F| > 20 eV/Å, an adsorbate piece > 4 Å from the slab),
    where the run stops. The oracle's own run is the reference: its drift is ≈ 0.
    """
    from forcenet.physics.md import NVESettings

    settings = NVESettings(
        temperature_K=temperature,
        timestep_fs=timestep_fs,
        steps=steps,
        interval=interval,
        seed=seed,
    )
    summary = md_command(
        checkpoint,
        inputs,
        out,
        settings,
        structures=structures,
        oracle_reference=oracle_reference,
        device=device,
    )
    shown = summary[SHOWN].fillna({"event": "-"})  # None: stable for the whole run
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
