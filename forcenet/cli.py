"""The ``forcenet`` command line: the library's jobs, each with explicit arguments.

It knows nothing of ``params.yaml``, DVC or MLflow: the DVC pipeline (``pipeline/``)
reads the params and tracks the runs; these commands are for using the library by hand
(your own data, a checkpoint, a cluster job array). Heavy libraries are imported inside
the commands so that ``forcenet --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help=(
        "Train and evaluate force-predicting graph neural networks (ForceNet, SchNet, "
        "DimeNet++, GNS) on OC20-style data.\n\n"
        "Steps: data generate/download/ingest -> preprocess -> neighbors -> train -> "
        "evaluate -> relax. `dvc repro` runs them all from params.yaml (see README)."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(help="Raw data: generate, download, ingest, inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")

from forcenet.physics.cli import physics_app  # noqa: E402  (light: typer only)

app.add_typer(physics_app, name="physics")

from forcenet.cli_options import DeviceOpt, OptimizerOpt, WorkersOpt  # noqa: E402

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


@data_app.command("generate")
def data_generate(
    out: Annotated[Path, typer.Argument(help="Raw output root (replaced as a whole).")],
    systems: Annotated[
        list[str],
        typer.Option(help="SPLIT=N (repeatable): N adsorbate+slab systems in split SPLIT."),
    ],
    seed: Annotated[int, typer.Option(help="Random seed (the data depend on it alone).")] = 0,
    frames_per_system: Annotated[int, typer.Option(help="Relaxation frames per system.")] = 14,
    md_frames_per_system: Annotated[int, typer.Option(help="MD frames per system.")] = 6,
    relax_steps: Annotated[int, typer.Option(help="BFGS steps of the sampled relaxation.")] = 40,
    md_temperature: Annotated[float, typer.Option(help="MD temperature (K).")] = 600.0,
    max_force: Annotated[float, typer.Option(help="Reject frames above (eV/Å).")] = 15.0,
    workers: WorkersOpt = 2,
    shard_size: Annotated[int, typer.Option(help="Frames per raw shard.")] = 5000,
    is2rs_out: Annotated[
        Path | None, typer.Option(help="Also write validation systems to relax against EMT.")
    ] = None,
    is2rs_systems: Annotated[int, typer.Option(help="Such systems per validation split.")] = 8,
    is2rs_fmax: Annotated[
        float, typer.Option(help="The oracle's relaxation target (eV/Å).")
    ] = 0.02,
) -> None:
    """Generate an OC20-like dataset: adsorbates on metal slabs labelled by EMT, in the
    OC20 raw layout (OUT/SPLIT/K.extxyz.xz + K.txt.xz)."""
    from forcenet.emt.generate import generate_emt

    counts: dict[str, int] = {}
    for item in systems:
        name, _, n = item.partition("=")
        if not name or not n.isdigit():
            raise typer.BadParameter(f"--systems must be SPLIT=N, got {item!r}")
        counts[name] = int(n)
    _echo_json(
        generate_emt(
            out,
            seed=seed,
            n_systems=counts,
            frames_per_system=frames_per_system,
            md_frames_per_system=md_frames_per_system,
            relax_steps=relax_steps,
            md_temperature_K=md_temperature,
            max_force=max_force,
            workers=workers,
            shard_size=shard_size,
            is2rs_dir=is2rs_out,
            is2rs_systems=is2rs_systems,
            is2rs_fmax=is2rs_fmax,
        )
    )


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
    from forcenet.data.preprocess import preprocess as run

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
    from forcenet.data.graph_build import build_graphs

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
    from forcenet.data.manifest import write_manifest

    _echo_json(write_manifest(split_dir, kind))


# ---------------------------------------------------------------- train, evaluate


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="A model of forcenet.models.MODELS, e.g. forcenet.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (last.pt, best.pt).")],
    frames: Annotated[Path, typer.Option(help="Frame split folder, e.g. data/lmdb/train.")],
    graphs: Annotated[
        Path | None,
        typer.Option(
            help="Its graph split folder, e.g. data/graphs/train. Leave it out for "
            "on-the-fly graphs (--cutoff, --max-neighbors)."
        ),
    ] = None,
    cutoff: Annotated[
        float | None, typer.Option(help="On-the-fly graphs: cutoff radius [Å] (OC20: 6).")
    ] = None,
    max_neighbors: Annotated[
        int | None,
        typer.Option(help="On-the-fly graphs: nearest neighbors kept per atom (OC20: 50)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML with `model:` (constructor arguments) and `train:` (TrainConfig "
            "fields); missing entries take the defaults.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="model.KEY=VALUE or train.KEY=VALUE (repeatable), over --config."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/last.pt (same weights as no interruption).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier run in OUT instead of refusing it.")
    ] = False,
    allow_changed: Annotated[
        bool,
        typer.Option(
            help="With --resume: continue although the settings or the training data "
            "differ from the run's (refused otherwise, naming the keys)."
        ),
    ] = False,
) -> None:
    """Train one model. The cutoff and neighbor count come from the graph store (--graphs),
    or, without one, are given with --cutoff and --max-neighbors: every batch then gets
    its graph built on the training device (the same edges as a graph store). One run
    at a time may write into OUT; an earlier run there is continued with --resume or
    replaced with --overwrite.

    Runs on the GPU when there is one. For several GPUs or nodes launch it with
    torchrun (e.g. `torchrun --standalone --nproc_per_node=8 -m forcenet.cli train ...`).
    """
    import contextlib

    from forcenet.data.graphs import GraphSettings, read_graph_settings
    from forcenet.distributed import is_rank_zero
    from forcenet.outdir import exclusive_folder, prepare_run_folder
    from forcenet.train import fit
    from forcenet.train.config import load_run_config

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    if allow_changed and not resume:
        raise typer.BadParameter("--allow-changed is for --resume")
    kwargs, cfg = load_run_config(model, config, set_ or ())
    given = cutoff is not None or max_neighbors is not None
    if graphs is not None and given:
        raise typer.BadParameter("--cutoff/--max-neighbors are for on-the-fly graphs: no --graphs")
    if graphs is None and (cutoff is None or max_neighbors is None):
        raise typer.BadParameter("pass --graphs, or --cutoff and --max-neighbors (on the fly)")
    if graphs is not None:
        settings = read_graph_settings(graphs)
    else:
        assert cutoff is not None and max_neighbors is not None
        settings = GraphSettings(cutoff=cutoff, max_neighbors=max_neighbors)
    if "cutoff" in kwargs and float(kwargs["cutoff"]) != float(settings.cutoff):
        source = f"the graph store {graphs}" if graphs is not None else "--cutoff"
        raise ValueError(
            f"model.cutoff={kwargs['cutoff']} differs from the cutoff {settings.cutoff} Å of "
            f"{source}: the model's cutoff is its graphs'; leave model.cutoff out, or build "
            "graphs with that cutoff"
        )
    kwargs["cutoff"] = settings.cutoff
    rank_zero = is_rank_zero()  # under torchrun, rank 0 owns OUT
    with exclusive_folder(out) if rank_zero else contextlib.nullcontext(out):
        if rank_zero:
            prepare_run_folder(out, resume=resume, overwrite=overwrite)
        snapshot = {"model": {model: kwargs}, "train": vars(cfg), "graph": settings.as_dict()}
        best = fit(
            cfg,
            model,
            kwargs,
            train_dir=frames,
            graphs_dir=graphs,
            graph=None if graphs is not None else settings,
            out_dir=out,
            resume=resume,
            allow_changed=allow_changed,
            params_snapshot=snapshot,
        )
    typer.echo(f"train {model}: done; checkpoint to evaluate: {best}")


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
        Path | None, typer.Option(help="Graph store root, needed for LMDB inputs.")
    ] = None,
    on_the_fly: Annotated[
        bool,
        typer.Option(
            help="Read LMDB splits without their graph store and build each batch's graph "
            "on the device, with the checkpoint's cutoff and neighbor count."
        ),
    ] = False,
    predictions: Annotated[
        Path | None, typer.Option(help="Also write per-atom predictions (Parquet).")
    ] = None,
    metrics_json: Annotated[
        Path | None, typer.Option(help="Also write {split: {metric: value}} JSON.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Structures per batch.")] = 16,
    device: DeviceOpt = None,
) -> None:
    """OC20 metrics on free atoms (force MAE with the zero-force baseline, cosine,
    magnitude, energy MAE and EFwT where the model has an energy), inference throughput
    and the rotation-covariance error, per split."""
    from forcenet.evaluate import evaluate_checkpoint, read_paths
    from forcenet.inputs import check_outputs
    from forcenet.tables import write_metrics_json, write_table

    outputs = {"--out": out, "--predictions": predictions, "--metrics-json": metrics_json}
    check_outputs(outputs, read_paths(checkpoint, inputs, graphs))
    table = evaluate_checkpoint(
        checkpoint,
        inputs,
        graphs=graphs,
        batch_size=batch_size,
        device=device,
        predictions=predictions,
        on_the_fly=on_the_fly,
    )
    write_table(table, out)
    if metrics_json is not None:
        write_metrics_json(table, metrics_json)
    wide = table.pivot_table(index="metric", columns="split", values="value")
    keep = [
        m for m in ("forces_mae", "zero_forces_mae", "forces_cos", "energy_mae") if m in wide.index
    ]
    typer.echo(wide.loc[keep].to_string(float_format=lambda v: f"{v:.4f}"))


@app.command("checkpoint-resave")
def checkpoint_resave(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    out: Annotated[
        Path | None, typer.Option(help="Write the re-saved checkpoint here (default: in place).")
    ] = None,
) -> None:
    """Re-save a checkpoint written before checkpoints carried a checksum, adding one.
    Only for a file you trust: from then on any change to it is refused at load. A file
    whose checksum does not match is refused, not re-saved."""
    from forcenet.checkpoint import resave_checkpoint

    _echo_json(resave_checkpoint(checkpoint, out))


# ----------------------------------------------------------------------- relax


@app.command()
def relax(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    inputs: Annotated[list[Path], typer.Argument(help="ASE-readable files of structures.")],
    out: Annotated[Path, typer.Option(help="Folder for trajectories and summary.parquet.")],
    optimizer: OptimizerOpt = "lbfgs",
    fmax: Annotated[
        float, typer.Option(help="Converged when max |F| on free atoms < fmax (eV/Å).")
    ] = 0.05,
    steps: Annotated[int, typer.Option(help="Maximum optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Structures relaxed together per forward.")] = 1,
    device: DeviceOpt = None,
) -> None:
    """Relax structures with a trained model (fixed atoms stay put); writes trajectories
    and a Parquet summary (steps, final max force, converged, wall time)."""
    from forcenet.relax import relax_command

    summary = relax_command(
        checkpoint,
        inputs,
        out,
        optimizer,
        fmax,
        steps,
        batch_size=batch_size,
        device=device,
    )
    typer.echo(summary.to_string(index=False))


@app.command("relax-oracle")
def relax_oracle(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `forcenet train`.")],
    is2rs: Annotated[Path, typer.Argument(help="Folder of SPLIT_initial/_relaxed.extxyz.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    splits: Annotated[
        list[str] | None,
        typer.Option(help="Validation splits to relax (repeatable; default: all four)."),
    ] = None,
    optimizer: OptimizerOpt = "lbfgs",
    fmax: Annotated[
        float, typer.Option(help="Converged when max |F| on free atoms < fmax (eV/Å).")
    ] = 0.05,
    steps: Annotated[
        int,
        typer.Option(
            help="Maximum ML optimizer steps, recorded as ml_steps_limit (OC20: 200 LBFGS "
            "steps; with --fmax 0 all of them)."
        ),
    ] = 200,
    batch_size: Annotated[int, typer.Option(help="Structures relaxed together.")] = 16,
    table: Annotated[
        Path | None, typer.Option(help="Also write the aggregates as a long Parquet table.")
    ] = None,
    metrics_json: Annotated[
        Path | None, typer.Option(help="Also write the aggregates as JSON.")
    ] = None,
    hybrid: Annotated[
        bool,
        typer.Option(
            help="Also finish each ML result with the oracle (EMT, LBFGS) and compare with an "
            "oracle-only relaxation from the initial structure: oracle steps saved, same "
            "minimum, ADwT."
        ),
    ] = False,
    oracle_steps: Annotated[
        int, typer.Option(help="Maximum oracle LBFGS steps of each hybrid/oracle-only run.")
    ] = 400,
    oracle_fmax: Annotated[
        float, typer.Option(help="The oracle's target max |F| on free atoms (eV/Å).")
    ] = 0.05,
) -> None:
    """Relax the validation systems with the model and check every result with the
    oracle (EMT): ADwT, FbT-oracle (oracle max force < 0.05 eV/Å) and the oracle energy
    above the oracle's own minimum; with --hybrid also the oracle steps an ML
    pre-relaxation saves."""
    from forcenet.data.keys import VAL_SPLITS
    from forcenet.oracle import evaluate_relaxations, metrics_long_table
    from forcenet.tables import write_metrics_json, write_table

    aggregate = evaluate_relaxations(
        checkpoint,
        is2rs,
        splits or list(VAL_SPLITS),
        out_dir=out,
        fmax=fmax,
        steps=steps,
        optimizer=optimizer,
        batch_size=batch_size,
        hybrid=hybrid,
        oracle_fmax=oracle_fmax,
        oracle_steps=oracle_steps,
    )
    if len(aggregate):
        long = metrics_long_table(aggregate)
        if table is not None:
            write_table(long, table)
        if metrics_json is not None:
            write_metrics_json(long, metrics_json)
    typer.echo(aggregate.to_string(index=False))


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
