"""Stage ``relax``: ML relaxations of the embedded validation systems, scored by the oracle.

Settings from params.yaml ``relax``: at most ``steps`` ML steps, and with ``hybrid`` the
oracle finishing each ML result against an oracle-only relaxation
(:func:`forcenet.oracle.evaluate_relaxations`). Writes the trajectories and per-system
table into ``--out``, the aggregates (ADwT, FbT-oracle, oracle energy above its own
minimum, oracle steps saved by the hybrid, the step limits; per split and, for hybrid
runs, ``overall``) as a long Parquet table and as DVC metrics JSON, and logs them to the
model's MLflow run. Results only: the stage's seconds go to the ``--timing`` file
(:mod:`pipeline.timing`).

    python -m pipeline.relax data/models/forcenet/best.pt data/is2rs --out data/relax/forcenet \\
        --table reports/relax/forcenet.parquet --metrics-json reports/metrics/relax_forcenet.json \\
        --timing reports/timing/relax_forcenet.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from forcenet.tables import write_metrics_json, write_table
from pipeline import stage, tracking
from pipeline.params import load_params
from pipeline.timing import write_timing


def main(argv: Sequence[str] | None = None) -> None:
    from forcenet.oracle import OVERALL_SPLIT, evaluate_relaxations, metrics_long_table

    p = stage.parser(__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("is2rs", type=Path, help="folder of SPLIT_initial/_relaxed.extxyz")
    p.add_argument("--out", type=Path, required=True, help="trajectories and per-system table")
    p.add_argument("--table", type=Path, required=True, help="aggregates as a long table")
    p.add_argument("--metrics-json", type=Path, required=True, help="aggregates for DVC")
    p.add_argument("--timing", type=Path, help="timing file (seconds)")
    args = p.parse_args(argv)
    r = load_params(args.params).relax
    start = time.perf_counter()
    aggregate = evaluate_relaxations(
        args.checkpoint,
        args.is2rs,
        r.splits,
        out_dir=args.out,
        fmax=r.fmax,
        steps=r.steps,
        optimizer=r.optimizer,
        batch_size=r.batch_size,
        hybrid=r.hybrid,
        oracle_fmax=r.oracle_fmax,
        oracle_steps=r.oracle_steps,
    )
    if not len(aggregate):
        print(f"relax: no validation systems in {args.is2rs}; nothing relaxed")
        return
    long = metrics_long_table(aggregate)
    write_table(long, args.table)
    write_metrics_json(stage.dvc_metrics(long), args.metrics_json)
    name = str(aggregate["model"].iloc[0])
    run_id = tracking.training_run_id(args.checkpoint.parent)
    run = tracking.attach_run(model=name, run_id=run_id, stage="relax")
    if args.timing is not None:
        seconds = time.perf_counter() - start
        write_timing(
            args.timing, {"seconds": seconds, "mlflow_run_id": run.run_id if run else None}
        )
    tracking.log_split_metrics(run, long)
    tracking.log_artifacts(run, sorted(args.out.glob("*.png")), artifact_path="relax")
    tracking.finish_run(run)
    adwt = long[long.metric == "adwt"].set_index("split")["value"]
    summary = ", ".join(f"{s} {v:.3f}" for s, v in adwt.items())
    saved = long[(long.metric == "hybrid_steps_saved_total_pct") & (long.split == OVERALL_SPLIT)]
    if len(saved):
        summary += f"; hybrid saves {saved.value.iloc[0]:.0f} % of the oracle's steps"
    print(f"relax {name}: ADwT {summary} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    stage.run(main)
