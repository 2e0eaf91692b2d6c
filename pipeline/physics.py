"""Stage ``physics``: what one model's forces do physically, on a few IS2RS structures.

Settings from params.yaml ``physics``; the structures are those of
:func:`pipeline.physics_inputs.physics_structures`:

* **conservation** on the first ``conservation.structures``: the asymmetry lambda of the
  free-atom force Jacobian (0 = conservative) and the normalised work around small closed
  loops, in float64 with the graph fixed
  (:func:`forcenet.physics.conservation.conservation_table`);
* **NVE MD** driven by the model on the first ``md.structures``, judged by the oracle's
  total energy: its drift and fluctuation, the model's own drift where it has an energy,
  and the first unphysical event (:func:`forcenet.physics.md.run_models`); stage
  ``physics_oracle`` runs the oracle's own reference from the same starts.

Writes ``--out/conservation.parquet`` (one row per structure), the MD files of
:func:`forcenet.physics.md.run_md`, the aggregates as a long table (splits
``conservation`` and ``md``) and as DVC metrics JSON, and logs them to the model's MLflow
run as ``conservation/...`` and ``md/...``. Results only: the seconds go to the
``--timing`` file (:mod:`pipeline.timing`).

    python -m pipeline.physics data/models/forcenet/best.pt data/is2rs \\
        --out data/physics/forcenet --table reports/physics/forcenet.parquet \\
        --metrics-json reports/metrics/physics_forcenet.json \\
        --timing reports/timing/physics_forcenet.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from forcenet.tables import long_table, write_metrics_json, write_table
from pipeline import stage, tracking
from pipeline.params import PhysicsConfig, load_params
from pipeline.physics_inputs import has_structures, md_line, nve_settings, physics_structures
from pipeline.timing import write_timing

if TYPE_CHECKING:
    from ase import Atoms

#: The split of the conservation rows in the long table.
CONSERVATION_SPLIT = "conservation"
CONSERVATION_TABLE = "conservation.parquet"


def conservation_rows(
    checkpoint: Path, structures: list[Atoms], names: list[str], out: Path
) -> pd.DataFrame:
    """lambda and loop work of the model of ``checkpoint`` per structure (written to
    ``out/conservation.parquet``); their summary as long-table rows."""
    import torch

    from forcenet.checkpoint import load_model
    from forcenet.data.graphs import GraphSettings
    from forcenet.distributed import pick_device
    from forcenet.physics.conservation import conservation_summary, conservation_table

    device = pick_device(None)
    model, ckpt = load_model(checkpoint, device=device)
    name = str(ckpt["model_name"])
    table = conservation_table(
        model,
        structures,
        graph=GraphSettings.from_mapping(ckpt["graph"]),
        names=names,
        dtype=torch.float64,
        device=device,
    )
    table.insert(0, "model", name)
    write_table(table, out / CONSERVATION_TABLE)
    return long_table(name, CONSERVATION_SPLIT, conservation_summary(table), None)


def physics_checks(
    checkpoint: Path,
    is2rs: Path,
    physics: PhysicsConfig,
    out: Path,
    clock: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Conservation and NVE MD of one checkpoint (files in ``out``); the long table
    (results only; ``clock`` gets the MD's seconds, see
    :func:`forcenet.physics.md.run_md`)."""
    from forcenet.calculator import ForceNetCalculator
    from forcenet.physics.md import run_md

    count = max(physics.conservation.structures, physics.md.structures)
    atoms, names = physics_structures(is2rs, physics.splits, count)
    n_cons, n_md = physics.conservation.structures, physics.md.structures
    conservation = conservation_rows(checkpoint, atoms[:n_cons], names[:n_cons], out)
    calc = ForceNetCalculator.from_checkpoint(checkpoint)
    settings = nve_settings(physics.md)
    md = run_md({calc.model_name: calc}, atoms[:n_md], names[:n_md], settings, out, clock=clock)
    return pd.concat([conservation, md], ignore_index=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("is2rs", type=Path, help="folder of SPLIT_initial.extxyz")
    p.add_argument("--out", type=Path, required=True, help="per-structure tables, MD series, plot")
    p.add_argument("--table", type=Path, required=True, help="aggregates as a long table")
    p.add_argument("--metrics-json", type=Path, required=True, help="aggregates for DVC")
    p.add_argument("--timing", type=Path, help="timing file (seconds)")
    args = p.parse_args(argv)
    physics = load_params(args.params).physics
    if not has_structures(args.is2rs):
        return
    start = time.perf_counter()
    clock: dict[str, float] = {}
    long = physics_checks(args.checkpoint, args.is2rs, physics, args.out, clock)
    write_table(long, args.table)
    write_metrics_json(stage.dvc_metrics(long), args.metrics_json)
    name = str(long["model"].iloc[0])
    run_id = tracking.training_run_id(args.checkpoint.parent)
    run = tracking.attach_run(model=name, run_id=run_id, stage="physics")
    if args.timing is not None:
        clock["seconds"] = time.perf_counter() - start
        write_timing(args.timing, {**clock, "mlflow_run_id": run.run_id if run else None})
    tracking.log_split_metrics(run, long)
    from forcenet.physics.md import MD_PLOT, MD_SUMMARY

    files = [args.out / f for f in (CONSERVATION_TABLE, MD_SUMMARY, MD_PLOT)]
    tracking.log_artifacts(run, files, artifact_path="physics")
    tracking.finish_run(run)
    lam = long[(long.split == CONSERVATION_SPLIT) & (long.metric == "lambda_mean")].value.iloc[0]
    print(
        f"physics {name}: lambda mean {lam:.3g}; {md_line(long)} "
        f"({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    stage.run(main)
