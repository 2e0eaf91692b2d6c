"""The ``forcenet`` command line: every pipeline stage is a subcommand with explicit paths.

The DVC stages in ``dvc.yaml`` are thin calls of these commands. Heavy libraries are
imported inside the commands so that ``forcenet --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help=(
        "Train and evaluate force-predicting graph neural networks (ForceNet, SchNet, "
        "DimeNet++, GNS) on OC20-style data.\n\n"
        "Pipeline: data acquire -> preprocess -> neighbors -> train -> evaluate -> relax -> "
        "report. `dvc repro` runs it all from params.yaml."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(help="Raw data: generate, download, ingest, inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params.yaml to read settings from.", exists=True)
]
WorkersOpt = Annotated[int, typer.Option(help="Parallel worker processes (1 = in-process).")]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        help="Do only shards k with k % n == i, given as 'i/n' (one task of a cluster job "
        "array). The split manifest is written once every shard exists; "
        "`forcenet manifest` merges afterwards."
    ),
]


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise typer.BadParameter(f"--shard must look like 'i/n', got {value!r}") from None
    if n <= 0 or not 0 <= i < n:
        raise typer.BadParameter(f"--shard needs 0 <= i < n, got {value!r}")
    return i, n


def _echo_json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------- data


@data_app.command("acquire")
def data_acquire(
    out: Annotated[Path, typer.Option(help="Raw output root: OUT/SPLIT/K.extxyz.xz.")],
    is2rs_out: Annotated[
        Path, typer.Option(help="Folder for initial/relaxed validation systems (emt only).")
    ] = Path("data/is2rs"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Get raw data as `data.source` in params.yaml says: emt (generate), oc20 (download)
    or files (ingest your own). This is the first DVC stage."""
    from forcenet.config import load_data_config
    from forcenet.sources import acquire

    _echo_json(acquire(load_data_config(params), out, is2rs_out))


@data_app.command("generate")
def data_generate(
    out: Annotated[Path, typer.Argument(help="Raw output root.")],
    is2rs_out: Annotated[
        Path, typer.Option(help="Folder for validation relaxation systems.")
    ] = Path("data/is2rs"),
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Generate the embedded OC20-like dataset (adsorbates on metal slabs, EMT labels)
    with the sizes in params.yaml `data.emt`."""
    from forcenet.config import load_data_config
    from forcenet.sources import generate

    _echo_json(generate(load_data_config(params), out, is2rs_out))


@data_app.command("download")
def data_download(
    out: Annotated[Path, typer.Argument(help="Raw output root.")],
    base_url: Annotated[
        str, typer.Option(help="Where the OC20 archives are served.")
    ] = "https://dl.fbaipublicfiles.com/opencatalystproject/data/",
    train: Annotated[str, typer.Option(help="Training split: 200k, 2M, 20M or all.")] = "200k",
    workdir: Annotated[
        Path | None, typer.Option(help="Where archives are kept (default: OUT/../downloads).")
    ] = None,
) -> None:
    """Download the official OC20 S2EF archives (MD5-verified, resumable, safely
    extracted) and lay them out as OUT/SPLIT/K.extxyz.xz + K.txt.xz."""
    from forcenet.data.download import download_splits

    _echo_json(download_splits(out, base_url=base_url, train=train, workdir=workdir))


@data_app.command("ingest")
def data_ingest(
    out: Annotated[Path, typer.Argument(help="Raw output root.")],
    split: Annotated[
        list[str],
        typer.Option(
            help="NAME=FILE[,FILE...] (repeatable): ASE-readable files with energies and "
            "forces (extxyz, .traj, ASE db) that make split NAME."
        ),
    ],
    reference_energy: Annotated[
        float, typer.Option(help="Reference energy (eV) subtracted from every frame.")
    ] = 0.0,
) -> None:
    """Convert your own ASE-readable files into the raw OC20 layout."""
    from forcenet.data.ingest import ingest_files

    splits: dict[str, list[Path]] = {}
    for item in split:
        name, _, files = item.partition("=")
        if not name or not files:
            raise typer.BadParameter(f"--split must be NAME=FILE[,FILE...], got {item!r}")
        splits.setdefault(name, []).extend(Path(f) for f in files.split(","))
    _echo_json(ingest_files(splits, out, reference_energy=reference_energy))


@data_app.command("inspect")
def data_inspect(
    path: Annotated[Path, typer.Argument(help="A raw split folder or root, or an LMDB folder.")],
) -> None:
    """Print a human summary: frames, atoms, elements, tags, forces, edges per atom."""
    from forcenet.data.inspect import format_summary, inspect_path

    typer.echo(format_summary(inspect_path(path)))


# ----------------------------------------------------------------------- stores


@app.command()
def preprocess(
    raw: Annotated[Path, typer.Argument(help="Raw root holding SPLIT/K.extxyz.xz.")],
    out: Annotated[Path, typer.Argument(help="LMDB root: OUT/SPLIT/K.lmdb.")],
    workers: WorkersOpt = 2,
    shard: ShardOpt = None,
    splits: Annotated[list[str] | None, typer.Option(help="Only these splits.")] = None,
) -> None:
    """Raw frames -> LMDB shards of plain arrays (no pickle), one per raw shard."""
    from forcenet.data.store import preprocess as run

    _echo_json(run(raw, out, splits=splits, workers=workers, shard=_shard(shard)))


@app.command()
def neighbors(
    frames: Annotated[Path, typer.Argument(help="LMDB frame root (output of preprocess).")],
    out: Annotated[Path, typer.Argument(help="Graph root: OUT/SPLIT/K.lmdb.")],
    cutoff: Annotated[float, typer.Option(help="Neighbor cutoff radius (Å).")] = 6.0,
    max_neighbors: Annotated[
        int, typer.Option(help="Keep the nearest N neighbors per atom (ties: lower index).")
    ] = 50,
    workers: WorkersOpt = 2,
    shard: ShardOpt = None,
    splits: Annotated[list[str] | None, typer.Option(help="Only these splits.")] = None,
) -> None:
    """Precompute periodic neighbor lists (vesin) keyed like the frames."""
    from forcenet.data.graphs import build_graphs

    _echo_json(
        build_graphs(
            frames,
            out,
            cutoff=cutoff,
            max_neighbors=max_neighbors,
            splits=splits,
            workers=workers,
            shard=_shard(shard),
        )
    )


@app.command()
def manifest(
    split_dir: Annotated[Path, typer.Argument(help="A split folder of LMDB shards.")],
    kind: Annotated[str, typer.Option(help="frames or graphs.")] = "frames",
) -> None:
    """Write a split's manifest after sharded (--shard i/n) runs; fails on a missing or
    stale shard."""
    from forcenet.data.store import write_manifest

    _echo_json(write_manifest(split_dir, kind))


# ---------------------------------------------------------------- train, evaluate


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="forcenet, schnet, dimenetpp or gns.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (last.pt, best.pt, run_id.txt).")],
    frames: Annotated[Path, typer.Option(help="LMDB frame root holding train/.")] = Path(
        "data/lmdb"
    ),
    graphs: Annotated[Path, typer.Option(help="Graph root holding train/.")] = Path("data/graphs"),
    params: ParamsOpt = Path("params.yaml"),
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/last.pt (same weights as no interruption).")
    ] = False,
) -> None:
    """Train one model with `model.NAME` and `train.NAME` from params.yaml.

    Runs on the GPU when there is one. For several GPUs or nodes launch it with
    torchrun (e.g. `torchrun --standalone --nproc_per_node=8 -m forcenet.cli train ...`).
    """
    from forcenet.stages import train_model

    best = train_model(
        model, params_path=params, frames=frames, graphs=graphs, out=out, resume=resume
    )
    typer.echo(f"best checkpoint: {best}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="LMDB split folders (data/lmdb/SPLIT) and/or ASE-readable files with "
            "energies and forces (split = file name)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Long metrics table (Parquet).")],
    graphs: Annotated[
        Path | None, typer.Option(help="Graph root for LMDB inputs (default data/graphs).")
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Also write per-atom predictions (Parquet).")
    ] = None,
    metrics_json: Annotated[
        Path | None, typer.Option(help="Also write {split: {metric: value}} JSON for DVC.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Structures per batch.")] = 16,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: auto).")
    ] = None,
    track: Annotated[bool, typer.Option(help="Log to the checkpoint's MLflow run.")] = True,
) -> None:
    """OC20 metrics on free atoms (force MAE with the zero-force baseline, cosine,
    magnitude, energy MAE and EFwT where the model has an energy), inference throughput
    and the rotation-covariance error, per split."""
    from forcenet.stages import evaluate_model

    table = evaluate_model(
        checkpoint,
        inputs,
        out=out,
        graphs=graphs,
        predictions=predictions,
        metrics_json=metrics_json,
        batch_size=batch_size,
        device=device,
        track=track,
    )
    wide = table.pivot_table(index="metric", columns="split", values="value")
    keep = [
        m for m in ("forces_mae", "zero_forces_mae", "forces_cos", "energy_mae") if m in wide.index
    ]
    typer.echo(wide.loc[keep].to_string(float_format=lambda v: f"{v:.4f}"))


@app.command()
def report(
    metrics: Annotated[list[Path], typer.Argument(help="Metrics tables from `forcenet evaluate`.")],
    out: Annotated[Path, typer.Option(help="Report folder (results.md, plots/).")] = Path(
        "reports"
    ),
    predictions: Annotated[
        list[Path] | None, typer.Option(help="Per-atom predictions for parity plots.")
    ] = None,
    relax: Annotated[
        list[Path] | None, typer.Option(help="Relaxation summaries from `forcenet relax-oracle`.")
    ] = None,
) -> None:
    """Comparison table (Parquet, CSV, Markdown) and plots: force MAE per split with the
    zero baseline, learning curves from MLflow, force parity per model."""
    from forcenet.report import build_report

    build_report(metrics, out, predictions=predictions or ())
    typer.echo((out / "results.md").read_text())


# ----------------------------------------------------------------------- relax


@app.command()
def relax(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    inputs: Annotated[list[Path], typer.Argument(help="ASE-readable files of structures.")],
    out: Annotated[Path, typer.Option(help="Folder for trajectories and summary.parquet.")],
    optimizer: Annotated[str, typer.Option(help="lbfgs or fire.")] = "lbfgs",
    fmax: Annotated[
        float, typer.Option(help="Converged when max |F| on free atoms < fmax (eV/Å).")
    ] = 0.05,
    steps: Annotated[int, typer.Option(help="Maximum optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Structures relaxed together per forward.")] = 1,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: auto).")] = None,
) -> None:
    """Relax structures with a trained model (fixed atoms stay put); writes trajectories
    and a Parquet summary (steps, final max force, converged, wall time)."""
    from forcenet.relax import relax_command

    summary = relax_command(
        checkpoint, inputs, out, _optimizer(optimizer), fmax, steps, batch_size=batch_size,
        device=device,
    )  # fmt: skip
    typer.echo(summary.to_string(index=False))


@app.command("relax-oracle")
def relax_oracle(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    is2rs: Annotated[Path, typer.Argument(help="Folder of SPLIT_initial/_relaxed.extxyz.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    params: ParamsOpt = Path("params.yaml"),
    table: Annotated[
        Path | None, typer.Option(help="Also write the aggregates as a long Parquet table.")
    ] = None,
    metrics_json: Annotated[
        Path | None, typer.Option(help="Also write the aggregates as JSON for DVC.")
    ] = None,
    track: Annotated[bool, typer.Option(help="Log to the checkpoint's MLflow run.")] = True,
) -> None:
    """Relax the embedded validation systems with the model and check every result with
    the oracle (EMT): ADwT, FbT-oracle (oracle max force < 0.05 eV/Å) and the oracle
    energy above the oracle's own minimum. Settings from params.yaml `relax`."""
    from forcenet.stages import relax_against_oracle

    table = relax_against_oracle(
        checkpoint, is2rs, out=out, params_path=params, table=table, metrics_json=metrics_json,
        track=track,
    )  # fmt: skip
    typer.echo(table.to_string(index=False))


def _optimizer(name: str):
    if name not in ("lbfgs", "fire"):
        raise typer.BadParameter(f"--optimizer must be lbfgs or fire, got {name!r}")
    return name


def main() -> None:
    """Console entry point: expected failures (bad input, bad params) print one clear
    line naming the file and record instead of a traceback; set FORCENET_DEBUG=1 for it."""
    import os
    import sys

    try:
        app()
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("FORCENET_DEBUG"):
            raise
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
