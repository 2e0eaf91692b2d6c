"""``forcenet physics conservation`` (registered by :mod:`forcenet.physics.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from forcenet.cli_options import DeviceOpt

if TYPE_CHECKING:
    from ase import Atoms

DTYPES = ("float64", "float32")


def read_inputs(inputs: list[Path], limit: int | None) -> tuple[list[Atoms], list[str]]:
    """The structures of ASE-readable files in order (at most ``limit`` in all), each
    named ``FILE:RECORD``; a missing or unreadable file is a ValueError naming it."""
    from ase.io import read

    from forcenet.data.frame import check_atoms_geometry
    from forcenet.data.shards import check_regular_file

    structures: list[Atoms] = []
    names: list[str] = []
    for path in inputs:
        left = None if limit is None else limit - len(structures)
        if left is not None and left <= 0:
            break
        if not path.exists():
            raise ValueError(f"{path}: no such structure file")
        check_regular_file(path)
        try:
            images = read(str(path), index=":" if left is None else f":{left}")
        except Exception as exc:  # ASE raises many types for unreadable files
            raise ValueError(f"{path}: cannot read structures ({exc})") from exc
        images = images if isinstance(images, list) else [images]
        for k, atoms in enumerate(images):
            check_atoms_geometry(atoms, f"{path}: structure {k}")
        structures.extend(images)
        names.extend(f"{path.name}:{k}" for k in range(len(images)))
    if not structures:
        raise ValueError(f"no structures in {[str(p) for p in inputs]}")
    return structures, names


def conservation(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="ASE-readable structure files with FixAtoms constraints (e.g. the IS2RS "
            "SPLIT_initial.extxyz)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Per-structure table (Parquet).")],
    structures: Annotated[
        int | None, typer.Option(help="Only the first N structures over all inputs.")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="float64 (separates the model from rounding) or float32.")
    ] = "float64",
    device: DeviceOpt = None,
    step: Annotated[
        float, typer.Option(help="Finite-difference step (Å), used only without autograd.")
    ] = 1e-3,
    radius: Annotated[float, typer.Option(help="Radius of the work loops (Å).")] = 0.02,
    points: Annotated[int, typer.Option(help="Points per work loop.")] = 16,
    loops: Annotated[int, typer.Option(help="Random loop planes per structure.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random loop planes.")] = 0,
    metrics_json: Annotated[
        Path | None, typer.Option(help="Also write the summary as {conservation: {...}} JSON.")
    ] = None,
) -> None:
    """How far the model's forces are from conservative, per structure: the asymmetry
    lambda = |J - J^T| / (2 |J|) of the free-atom force Jacobian (0 = conservative) and
    the work around small closed loops, with the graph fixed at each structure."""
    import torch

    from forcenet.checkpoint import load_model
    from forcenet.data.graphs import GraphSettings
    from forcenet.distributed import pick_device
    from forcenet.physics.conservation import conservation_summary, conservation_table
    from forcenet.tables import long_table, write_metrics_json, write_table

    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if structures is not None and structures < 1:
        raise typer.BadParameter(f"--structures must be >= 1, got {structures}")
    target = pick_device(device)
    model, ckpt = load_model(checkpoint, device=target)
    atoms, names = read_inputs(list(inputs), structures)
    table = conservation_table(
        model,
        atoms,
        graph=GraphSettings.from_mapping(ckpt["graph"]),
        names=names,
        dtype=getattr(torch, dtype),
        device=target,
        step=step,
        radius=radius,
        points=points,
        loops=loops,
        seed=seed,
    )
    table.insert(0, "model", str(ckpt["model_name"]))
    write_table(table, out)
    summary = conservation_summary(table)
    if metrics_json is not None:
        write_metrics_json(
            long_table(str(ckpt["model_name"]), "conservation", summary, None), metrics_json
        )
    shown = ["structure", "n_free", "lambda", "method", "loop_work", "loop_work_normalised"]
    typer.echo(table[shown].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    typer.echo(
        f"lambda mean {summary['lambda_mean']:.3g}, median {summary['lambda_median']:.3g} "
        f"over {len(table)} structures"
    )
