"""Stage ``evaluate``: one model's checkpoint on every validation split.

Writes the long metrics table (Parquet), the per-atom predictions and the DVC metrics
JSON, results only, and logs the metrics, throughput included, as ``<split>/<metric>`` to
the model's MLflow training run (:func:`pipeline.tracking.training_run_id` of the
checkpoint's folder). The throughput and the stage's seconds go to the ``--timing`` file
(:mod:`pipeline.timing`). With ``graph.on_the_fly`` the graphs are built per batch on the
model's device instead of read from ``--graphs``.

    python -m pipeline.evaluate data/models/forcenet/best.pt data/lmdb/val_id ... \\
        --graphs data/graphs --out reports/eval/forcenet.parquet \\
        --predictions data/predictions/forcenet.parquet \\
        --metrics-json reports/metrics/forcenet.json \\
        --timing reports/timing/evaluate_forcenet.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from forcenet.tables import write_metrics_json, write_table
from pipeline import stage, tracking
from pipeline.params import load_params
from pipeline.timing import clock_rows, without_clock, write_timing


def main(argv: Sequence[str] | None = None) -> None:
    from forcenet.checkpoint import load_checkpoint
    from forcenet.evaluate import evaluate_checkpoint, read_paths
    from forcenet.inputs import check_outputs

    p = stage.parser(__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", type=Path, nargs="+", help="LMDB split folders")
    p.add_argument(
        "--graphs", type=Path, required=True, help="graph store root (unread with graph.on_the_fly)"
    )
    p.add_argument("--out", type=Path, required=True, help="long metrics table (Parquet)")
    p.add_argument("--predictions", type=Path, required=True, help="per-atom predictions")
    p.add_argument("--metrics-json", type=Path, required=True, help="metrics for DVC")
    p.add_argument("--timing", type=Path, help="timing file (seconds, throughput)")
    args = p.parse_args(argv)
    named = {"--out": args.out, "--predictions": args.predictions}
    named["--metrics-json"] = args.metrics_json
    # before anything: a failed run removes its outputs, which must never be an input
    check_outputs(named, read_paths(args.checkpoint, args.inputs, args.graphs))
    params = load_params(args.params)
    start = time.perf_counter()
    name = str(load_checkpoint(args.checkpoint)["model_name"])
    run = tracking.attach_run(model=name, run_id=tracking.training_run_id(args.checkpoint.parent))
    outputs = [args.predictions, args.out, args.metrics_json]
    outputs += [args.timing] if args.timing is not None else []
    try:
        table = evaluate_checkpoint(
            args.checkpoint,
            args.inputs,
            graphs=args.graphs,
            batch_size=params.evaluate.batch_size,
            predictions=args.predictions,
            on_the_fly=params.graph.on_the_fly,
        )
        tracking.log_split_metrics(run, table)  # before the tables: MLflow may refuse
        results = without_clock(table)
        write_table(results, args.out)
        write_metrics_json(stage.dvc_metrics(results), args.metrics_json)
        if args.timing is not None:
            timing = {"seconds": time.perf_counter() - start, "splits": clock_rows(table)}
            write_timing(args.timing, {**timing, "mlflow_run_id": run.run_id if run else None})
        artifacts = [args.out, args.predictions, args.checkpoint]
        tracking.log_artifacts(run, artifacts, artifact_path="evaluation")
    except BaseException:
        for path in outputs:  # nothing that looks complete is left behind
            path.unlink(missing_ok=True)
        tracking.finish_run(run, status="FAILED")
        raise
    tracking.finish_run(run)
    val = table[(table.metric == "forces_mae")].set_index("split")["value"]
    summary = ", ".join(f"{s} {v:.4f}" for s, v in val.items())
    print(f"evaluate {name}: force MAE [eV/Å] {summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    stage.run(main)
