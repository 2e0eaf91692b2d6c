"""Stage ``physics_oracle``: the oracle's own NVE runs, the reference of stage ``physics``.

The structures are the IS2RS initial structures the data stage writes
(``IS2RS/<split>_initial.extxyz``) of ``physics.splits``, taken in turn from each split
(the first of every split, then the second, ...) and named ``<split>:<sid>``; MD runs on
the first ``physics.md.structures`` of them, with the same seeded start for every driver
(:func:`forcenet.physics.md.run_models`). EMT driving itself measures the integrator
alone: its drift is the floor a model's drift is read against.

Writes ``--out/md_summary.parquet`` (one row per run), ``md_series.parquet`` (the oracle
energy every ``interval`` steps) and ``md_energy.png``, the aggregates as a long table
(split ``md``, :func:`forcenet.physics.md.md_metrics`) and optionally as DVC metrics JSON:
results only, the seconds go to the ``--timing`` file (:mod:`pipeline.timing`).

    python -m pipeline.physics_oracle data/is2rs --out data/physics/oracle \\
        --table reports/physics/oracle.parquet --metrics-json reports/metrics/physics_oracle.json \\
        --timing reports/timing/physics_oracle.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forcenet.tables import write_metrics_json, write_table
from pipeline import stage
from pipeline.params import load_params
from pipeline.physics_inputs import has_structures, md_line, nve_settings, physics_structures
from pipeline.timing import write_timing

if TYPE_CHECKING:
    pass


def main(argv: Sequence[str] | None = None) -> None:
    from forcenet.physics.md import ORACLE, oracle_driver, run_md

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
