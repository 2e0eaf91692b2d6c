"""The comparison tables of the report: metrics per model and split, per tag and element,
the training budget, and their Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.plots import TAG_GROUPS, split_order

#: Metrics of the comparison, in column order, with their Markdown headers.
SUMMARY_METRICS = {
    "forces_mae": "force MAE [eV/Å]",
    "zero_forces_mae": "zero-force MAE [eV/Å]",
    "forces_cos": "force cos",
    "forces_magnitude": "magnitude MAE [eV/Å]",
    "energy_mae": "energy MAE [eV]",
    "energy_force_within_threshold": "EFwT",
    "rotation_covariance_mae": "rotation-covariance error [eV/Å]",
    "inference_graphs_per_s": "graphs/s",
    "inference_atoms_per_s": "atoms/s",
}
#: Relaxation metrics (from ``forcenet relax-oracle``), shown in their own table.
RELAX_METRICS = {
    "relax_systems": "systems",
    "adwt": "ADwT",
    "fbt_oracle": "FbT-oracle",
    "oracle_delta_e_median": "oracle ΔE median [eV]",
    "relax_mean_distance": "mean distance to oracle minimum [Å]",
    "relax_converged_fraction": "converged (model fmax)",
    "relax_mean_steps": "mean steps",
}
#: Rows of the training run (forcenet.evaluate.TRAINING_ROWS) and their headers.
TRAINING_SPLIT = "training"
TRAINING_METRICS = {
    "parameters": "parameters",
    "train_steps": "optimizer steps",
    "train_epochs": "epochs",
    "train_seconds": "seconds",
    "train_graphs_seen": "graphs seen",
    "selected_step": "step of the evaluated checkpoint",
}
#: Below one pass over the training frames a model is flagged as under-trained.
MIN_EPOCHS = 1.0
_LONG_COLUMNS = ("model", "split", "metric", "value")


# --------------------------------------------------------------------------- tables


def load_metrics(paths: Sequence[Path]) -> pd.DataFrame:
    """Concatenate long metrics tables, naming a file that lacks a required column."""
    frames = []
    for path in paths:
        table = pd.read_parquet(path)
        missing = [c for c in _LONG_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: not a metrics table (missing columns {missing})")
        if "run_id" not in table.columns:
            table["run_id"] = ""
        frames.append(table)
    if not frames:
        raise ValueError("no metrics tables given")
    return pd.concat(frames, ignore_index=True)


def comparison_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, split) in split order, the summary metrics as columns (the
    rest after them); a metric evaluated twice keeps its last value. The rows of the
    training run (split ``training``) are not a split and are left out."""
    long = long[long.split != TRAINING_SPLIT]
    wide = long.pivot_table(
        index=["model", "split"], columns="metric", values="value", aggfunc="last"
    )
    wide.columns.name = None
    first = [m for m in SUMMARY_METRICS if m in wide.columns]
    wide = wide[first + sorted(set(wide.columns) - set(first))].reset_index()
    order = {s: i for i, s in enumerate(split_order(wide.split))}
    wide = wide.sort_values(
        ["split", "model"], key=lambda c: c.map(order) if c.name == "split" else c
    )
    return wide.reset_index(drop=True)


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or not math.isfinite(float(value)):
        return "–"
    v = float(value)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if 0 < abs(v) < 1e-3:  # e.g. float32 noise of a covariant model: keep it visible
        return f"{v:.1e}"
    return f"{v:.4f}"


def markdown_table(table: pd.DataFrame, headers: dict[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``table`` (numbers to 4 decimals, NaN as –)."""
    headers = headers or {}
    names = [headers.get(c, str(c)) for c in table.columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def force_mae_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Force MAE with models as rows and splits as columns, plus a zero-force baseline row."""
    splits = split_order(table.split)
    mat = table.pivot_table(index="model", columns="split", values="forces_mae", aggfunc="last")
    mat = mat.reindex(columns=splits)
    if "zero_forces_mae" in table.columns:
        zero = table.groupby("split")["zero_forces_mae"].first().reindex(splits)
        mat.loc["zero-force baseline"] = zero
    mat.columns.name = None
    return mat.reset_index()


def with_ratio(mae: pd.Series, zero: pd.Series, digits: int) -> list[str]:
    """``"MAE (ratio×)"`` per row, the ratio to the zero-force MAE; – where undefined."""
    return [
        f"{m:.{digits}f} ({m / z:.2f}×)" if math.isfinite(m) and z > 0 else "–"
        for m, z in zip(mae, zero, strict=True)
    ]


def per_tag_table(table: pd.DataFrame) -> pd.DataFrame:
    """Force MAE (ratio to the zero-force baseline) and force cos per model and split, for
    all free atoms, surface atoms and adsorbate atoms; empty without tags."""
    if "forces_mae_adsorbate" not in table.columns:
        return pd.DataFrame()
    out = table[["model", "split"]].copy()
    for g, label in TAG_GROUPS.items():
        out[f"{label}: MAE (× zero)"] = with_ratio(
            table[f"forces_mae{g}"], table[f"zero_forces_mae{g}"], 4
        )
        out[f"{label}: cos"] = table[f"forces_cos{g}"]
    return out


def per_element_table(table: pd.DataFrame) -> pd.DataFrame:
    """Adsorbate force MAE per element (ratio to its zero-force baseline), model × split."""
    prefix = "forces_mae_adsorbate_"
    elements = sorted(c.removeprefix(prefix) for c in table.columns if c.startswith(prefix))
    if not elements:
        return pd.DataFrame()
    out = table[["model", "split"]].copy()
    for el in elements:
        out[el] = with_ratio(table[prefix + el], table["zero_" + prefix + el], 3)
    return out


def training_table(training: pd.DataFrame) -> pd.DataFrame:
    """Size, steps, epochs, seconds and graphs seen per model (from the ``training`` rows),
    as display strings; a model that saw less than one epoch is flagged."""
    if training.empty:
        return pd.DataFrame()
    wide = training.pivot_table(index="model", columns="metric", values="value", aggfunc="last")
    cols = [m for m in TRAINING_METRICS if m in wide.columns]
    shown = wide[cols].map(lambda v: f"{v:,.0f}" if math.isfinite(v) else "–")
    if "train_epochs" in cols:
        epochs = wide["train_epochs"]
        shown["train_epochs"] = [
            f"{e:.2f}" + (" ⚠ under-trained" if e < MIN_EPOCHS else "") if math.isfinite(e) else "–"
            for e in epochs
        ]
    return shown.reset_index()


#: Columns that count things: shown as integers, not as 1.0000.
COUNT_METRICS = ("relax_systems", "num_structures", "num_free_atoms")


def counts_as_integers(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in COUNT_METRICS:
        if col in out.columns:
            out[col] = [f"{v:,.0f}" if math.isfinite(v) else "–" for v in out[col]]
    return out


def under_trained(training: pd.DataFrame) -> list[str]:
    """Models whose training saw less than one pass over the training frames."""
    rows = training[(training.metric == "train_epochs") & (training.value < MIN_EPOCHS)]
    return sorted(rows.model.unique())
