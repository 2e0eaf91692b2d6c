"""Evaluation outputs: the long metrics table, its DVC JSON, and per-atom predictions.

* the long metrics table (Parquet): ``model, split, metric, value, run_id``;
* a flat JSON ``{split: {metric: value}}`` for ``dvc metrics show``;
* per-atom predictions (Parquet): ``model, split, sid, fid, atom, atomic_number, tag,
  fixed, fx, fy, fz, pred_fx, pred_fy, pred_fz`` (eV/Å), streamed batch by batch.

Each is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from forcenet.atomic import PendingFile, atomic_write, write_text
from forcenet.data import keys as K
from forcenet.data.batch import Batch

TABLE_COLUMNS = ["model", "split", "metric", "value", "run_id"]
#: The ``split`` of the rows that describe the training run (steps, seconds, graphs seen).
TRAINING_ROWS = "training"

_PRED_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("split", pa.string()),
        ("sid", pa.int64()),
        ("fid", pa.int64()),
        ("atom", pa.int32()),
        ("atomic_number", pa.int16()),
        ("tag", pa.int8()),
        ("fixed", pa.bool_()),
        ("fx", pa.float32()),
        ("fy", pa.float32()),
        ("fz", pa.float32()),
        ("pred_fx", pa.float32()),
        ("pred_fy", pa.float32()),
        ("pred_fz", pa.float32()),
    ]
)


class PredictionWriter:
    """Streams per-atom predictions into a Parquet file, renamed into place on close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = PendingFile(self.path)
        self._writer = pq.ParquetWriter(self._file.tmp, _PRED_SCHEMA)

    def write(self, model: str, split: str, batch: Batch, forces: Tensor) -> None:
        """Rows of one batch; ``forces`` [N, 3] predicted, ``batch`` on any device."""
        b = {k: v.cpu() for k, v in batch.items()}
        natoms, graph = b[K.NATOMS], b[K.BATCH]  # [G], [N]
        starts = torch.cumsum(natoms, 0) - natoms  # [G] first atom of each graph
        n = int(graph.shape[0])
        sid = b.get(K.SID, torch.arange(len(natoms))).reshape(-1)[graph]  # [N]
        fid = b.get(K.FID, torch.zeros(len(natoms), dtype=torch.int64)).reshape(-1)[graph]
        true = b.get(K.FORCES, torch.full((n, 3), float("nan"))).numpy()
        pred = forces.detach().cpu().to(torch.float32).numpy()
        cols = {
            "model": pa.array([model] * n, pa.string()),
            "split": pa.array([split] * n, pa.string()),
            "sid": sid.numpy(),
            "fid": fid.numpy(),
            "atom": (torch.arange(n) - starts[graph]).numpy().astype(np.int32),
            "atomic_number": b[K.ATOMIC_NUMBERS].numpy().astype(np.int16),
            "tag": b[K.TAGS].numpy().astype(np.int8),
            "fixed": b[K.FIXED].numpy(),
        }
        for c, name in enumerate("xyz"):
            cols[f"f{name}"] = true[:, c].astype(np.float32)
            cols[f"pred_f{name}"] = pred[:, c]
        self._writer.write_table(pa.table(cols, schema=_PRED_SCHEMA))

    def close(self) -> None:
        """Finish the file and rename it into place."""
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        """Drop the partial file; ``path`` is left as it was."""
        self._writer.close()
        self._file.abort()


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write a Parquet file atomically (temporary name, then rename)."""
    with atomic_write(out) as tmp:
        table.to_parquet(tmp, index=False)


def write_metrics_json(table: pd.DataFrame, out: Path) -> None:
    """``{split: {metric: value}}`` for ``dvc metrics show``; NaN becomes null."""
    data: dict[str, dict[str, float | None]] = {}
    for row in table.itertuples(index=False):
        value = float(row.value)
        data.setdefault(row.split, {})[row.metric] = value if math.isfinite(value) else None
    write_text(out, json.dumps(data, indent=2, sort_keys=True) + "\n")


def long_table(
    model: str, split: str, metrics: dict[str, float], run_id: str | None
) -> pd.DataFrame:
    rows = [(model, split, name, float(value), run_id or "") for name, value in metrics.items()]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
