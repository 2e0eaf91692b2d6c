"""How long the stages took, kept apart from what they computed.

A stage's outputs that a later stage depends on (checkpoints, learning curves,
predictions, metrics tables, relaxation and MD runs) hold results only, so that a rerun
with unchanged inputs writes byte-identical files and DVC has nothing downstream to redo.
Wall-clock seconds and throughput, which differ on every run, go to one small JSON file
per stage and model instead, ``reports/timing/<stage>_<model>.json``: declared in
dvc.yaml as a metric with ``cache: false`` (``dvc metrics show`` lists them) and listed as
a dependency by no stage. The MLflow run id of the run that wrote it is kept there too
(``mlflow_run_id``): a fresh run gets a new one. The report reads these files to show
seconds and throughput; a missing one is named in the report, not an error.

Keys (all seconds are wall clock on the machine that ran the stage):

* ``train_<model>.json``: ``step`` (optimizer steps done), ``train_seconds`` (training,
  over all resumed runs where known), ``graphs_per_s`` (training structures per second
  over the last evaluation interval), ``curve`` (one ``{step, elapsed_s, graphs_per_s}``
  per dev evaluation, the rows of ``history.csv``);
* ``evaluate_<model>.json``: ``seconds`` and, per split, ``inference_graphs_per_s`` and
  ``inference_atoms_per_s`` (the forward pass alone, the first batch excluded);
* ``relax_<model>.json``, ``physics_<model>.json``, ``physics_oracle.json``: ``seconds``
  (the whole stage); the physics ones also ``md_wall_s`` (the NVE runs alone).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from forcenet.atomic import write_text

#: Metrics of the training callback and of the evaluation that are wall-clock figures.
CLOCK_METRICS = (
    "elapsed_s",
    "graphs_per_s",
    "train_seconds",
    "inference_graphs_per_s",
    "inference_atoms_per_s",
    "wall_s",
)
#: Per-row wall-clock columns of the relaxation and MD tables.
CLOCK_COLUMNS = ("wall_s",)


def timing_path(folder: Path, stage: str, model: str) -> Path:
    """``folder/<stage>_<model>.json``."""
    return Path(folder) / f"{stage}_{model}.json"


def _finite(value: Any) -> Any:
    """Plain JSON values: numbers rounded to what a clock can tell, NaN/inf as null."""
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    number = float(value)
    return round(number, 4) if math.isfinite(number) else None


def write_timing(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as the timing file ``path`` (atomically)."""
    return write_text(path, json.dumps(_finite(data), indent=2, sort_keys=True) + "\n")


def read_timing(path: Path) -> dict[str, Any] | None:
    """The timing file ``path``; None when it is missing. A file that is not a JSON
    object is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable timing file: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def without_clock(table: pd.DataFrame) -> pd.DataFrame:
    """A long metrics table without its wall-clock rows (:data:`CLOCK_METRICS`) and
    without the MLflow run id (emptied: the column stays for readers of the layout)."""
    out = table[~table.metric.isin(CLOCK_METRICS)].reset_index(drop=True)
    if "run_id" in out.columns:
        out = out.assign(run_id="")
    return out


def clock_rows(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of the wall-clock rows of a long metrics table."""
    rows = table[table.metric.isin(CLOCK_METRICS)]
    data: dict[str, dict[str, float]] = {}
    for row in rows.itertuples(index=False):
        data.setdefault(str(row.split), {})[str(row.metric)] = float(row.value)
    return data
