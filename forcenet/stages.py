"""Pipeline stages that combine library pieces: training and evaluation with tracking.

Each function is what one DVC stage runs (through the CLI): it reads params.yaml, calls
the library and records the run in MLflow (rank 0 only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forcenet import config, tracking


def train_model(
    name: str, *, params_path: Path, frames: Path, graphs: Path, out: Path, resume: bool
) -> Path:
    """Train model ``name`` on ``frames/train`` (+ ``graphs/train``); checkpoints in ``out``."""
    from forcenet.train import fit

    params = config.load_yaml(params_path)
    cfg = config.train_config(params, name)
    kwargs = config.model_kwargs(params, name)
    snapshot = _snapshot(params, name)
    run = tracking.start_training_run(model=name, params=snapshot, out_dir=out)
    try:
        best = fit(
            cfg,
            name,
            kwargs,
            train_dir=frames / "train",
            graphs_dir=graphs / "train",
            out_dir=out,
            graph=config.graph_settings(params),
            resume=resume,
            params_snapshot=snapshot,
            on_epoch_end=lambda step, metrics: tracking.log_epoch(run, step, metrics),
        )
    except BaseException:
        tracking.finish_run(run, status="FAILED")
        raise
    tracking.finish_run(run)
    return best


def _snapshot(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The params this model's run depends on (logged to MLflow, stored in checkpoints)."""
    train = config.section(params, "train")
    return {
        "model": {name: config.model_kwargs(params, name)},
        "train": {
            **{k: train[k] for k in config.SHARED_TRAIN_KEYS if k in train},
            name: dict(train[name]),
        },  # fmt: skip
        "graph": config.graph_settings(params),
        "data": {"source": config.section(params, "data.source")},
    }


def evaluate_model(
    checkpoint: Path,
    inputs: Sequence[Path],
    *,
    out: Path,
    graphs: Path | None,
    predictions: Path | None,
    metrics_json: Path | None,
    batch_size: int,
    device: str | None,
    track: bool,
):
    """Evaluate a checkpoint and attach the results to its training run in MLflow."""
    from forcenet.checkpoint import load_checkpoint
    from forcenet.evaluate import evaluate_checkpoint

    name = load_checkpoint(checkpoint)["model_name"]
    run = None
    if track:
        run = tracking.attach_run(model=name, run_id=tracking.read_run_id(checkpoint.parent))
    try:
        table = evaluate_checkpoint(
            checkpoint,
            inputs,
            out=out,
            batch_size=batch_size,
            device=device,
            graphs=graphs,
            predictions_out=predictions,
            metrics_json=metrics_json,
            run_id=run.run_id if run else None,
        )
        tracking.log_split_metrics(run, table)
        artifacts = [p for p in (out, predictions, checkpoint) if p is not None]
        tracking.log_artifacts(run, artifacts, artifact_path="evaluation")
    except BaseException:
        tracking.finish_run(run, status="FAILED")
        raise
    tracking.finish_run(run)
    return table


def relax_against_oracle(
    checkpoint: Path,
    is2rs: Path,
    *,
    out: Path,
    params_path: Path,
    table: Path | None,
    metrics_json: Path | None,
    track: bool,
):
    """ML relaxations of the embedded validation systems, scored by the oracle (EMT).

    Settings from params.yaml ``relax``. Writes ``out`` (trajectories, per-system table,
    plot) and, when given, the long metrics table ``table`` and ``metrics_json``.
    """
    from forcenet.evaluate import write_metrics_json, write_table
    from forcenet.relax import evaluate_relaxations, metrics_long_table

    r = config.load_relax_config(params_path)
    aggregate = evaluate_relaxations(
        checkpoint, is2rs, r.splits, out_dir=out, fmax=r.fmax, steps=r.steps,
        optimizer=r.optimizer, batch_size=r.batch_size,
    )  # fmt: skip
    run_id = tracking.read_run_id(checkpoint.parent)
    long = metrics_long_table(aggregate, run_id) if len(aggregate) else None
    if long is not None:
        if table is not None:
            write_table(long, table)
        if metrics_json is not None:
            write_metrics_json(long, metrics_json)
        if track:
            name = str(aggregate["model"].iloc[0])
            run = tracking.attach_run(model=name, run_id=run_id, stage="relax")
            tracking.log_split_metrics(run, long)
            tracking.log_artifacts(run, [p for p in out.glob("*.png")], artifact_path="relax")
            tracking.finish_run(run)
    return aggregate
