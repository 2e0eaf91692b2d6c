"""What every stage module shares: argument parsing, params loading and clean failures."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.params import PARAMS_FILE

#: The learning curve the train stage writes into its output folder (read by the report).
HISTORY_FILE = "history.csv"
#: The few figures per split that the DVC metrics files hold, for `dvc exp show` and
#: `dvc metrics diff` (the full tables, counts included, are the Parquet files under
#: reports/eval, reports/relax and reports/physics; seconds and throughput are in
#: reports/timing, see pipeline.timing).
DVC_METRICS = (
    "forces_mae",
    "forces_mae_surface",
    "forces_mae_adsorbate",
    "forces_cos",
    "energy_mae",
    "train_steps",
    "adwt",
    "fbt_oracle",
    "oracle_delta_e_median",
    "hybrid_steps_saved_pct",
    "hybrid_same_minimum",
    "hybrid_adwt",
    "lambda_mean",
    "drift_abs_mean",
    "fluctuation_mean",
    "stable_fraction",
)


def dvc_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a long metrics table that go into its DVC metrics JSON."""
    return table[table.metric.isin(DVC_METRICS)]


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the common ``--params`` option."""
    p = argparse.ArgumentParser(
        description=(description or "").strip(), formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--params",
        type=Path,
        default=PARAMS_FILE,
        help="params.yaml to read (default: %(default)s)",
    )
    return p


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main``; an expected failure (bad input or params, a missing file)
    prints one ``error:`` line naming the file and exits 1. ``FORCENET_DEBUG=1`` shows the
    traceback instead."""
    try:
        main(argv)
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("FORCENET_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def echo_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
