"""The comparison tables of the report: metrics per model and split, per tag and element,
the training budget, and their Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from forcenet.data.keys import split_order
from forcenet.physics.md import ORACLE
from forcenet.tables import TRAINING_ROWS
from pipeline.params import MODEL_NAMES
from pipeline.plots import TAG_GROUPS

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
    "ml_steps_limit": "ML step limit",
}
#: Hybrid relaxations (ML, then the oracle), against oracle-only ones; their own table.
HYBRID_METRICS = {
    "hybrid_steps_saved_pct": "oracle steps saved [%]",
    "hybrid_steps_saved_pct_median": "median saved [%]",
    "hybrid_steps_saved_total_pct": "total saved [%]",
    "hybrid_same_minimum": "same minimum",
    "hybrid_adwt": "hybrid ADwT",
    "hybrid_delta_e_median": "hybrid ΔE median [eV]",
    "hybrid_oracle_mean_steps": "hybrid oracle steps",
    "oracle_only_mean_steps": "oracle-only steps",
    "hybrid_converged_fraction": "hybrid converged",
    "ml_steps_limit": "ML step limit",
    "oracle_steps_limit": "oracle step limit",
}
#: Columns of the hybrid table shown with one decimal (percentages, mean step counts).
_ONE_DECIMAL = (
    "hybrid_steps_saved_pct",
    "hybrid_steps_saved_pct_median",
    "hybrid_steps_saved_total_pct",
    "hybrid_oracle_mean_steps",
    "oracle_only_mean_steps",
)
#: The physics table: (split, metric) of the physics stages' long tables -> header.
PHYSICS_COLUMNS = {
    ("conservation", "lambda_mean"): "λ mean",
    ("conservation", "lambda_median"): "λ median",
    ("conservation", "loop_work_normalised_mean"): "loop work (normalised)",
    ("md", "drift_abs_mean"): "drift [eV/atom/ps]",
    ("md", "fluctuation_mean"): "fluctuation [eV/atom]",
    ("md", "model_drift_abs_mean"): "own-energy drift [eV/atom/ps]",
    ("md", "stable_fraction"): "stable runs",
}
#: The model name of the oracle's reference rows.
ORACLE_MODEL = ORACLE
#: The split of the training run's rows.
TRAINING_SPLIT = TRAINING_ROWS
#: The training run's rows and their headers.
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
COUNT_METRICS = (
    "relax_systems",
    "num_structures",
    "num_free_atoms",
    "ml_steps_limit",
    "oracle_steps_limit",
)


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


# --------------------------------------------------------------------------- hybrid, physics


def hybrid_table(table: pd.DataFrame) -> pd.DataFrame:
    """The hybrid relaxation metrics per model and split (``overall`` included) as
    display strings; empty when no run was hybrid."""
    if "hybrid_steps_saved_pct" not in table.columns:
        return pd.DataFrame()
    rows = table.dropna(subset=["hybrid_steps_saved_pct", "hybrid_adwt"], how="all")
    cols = [m for m in HYBRID_METRICS if m in rows.columns]
    out = counts_as_integers(rows[["model", "split", *cols]])
    for col in _ONE_DECIMAL:
        if col in out.columns:
            out[col] = [f"{v:.1f}" if math.isfinite(v) else "–" for v in rows[col]]
    return out.reset_index(drop=True)


def _first_event(metrics: pd.Series) -> str:
    """``"0.105 ps (close_contact ×1)"``: the earliest event and the runs ended by each
    kind; ``none`` when every run was stable, – without MD."""
    first = metrics.get("first_event_ps", math.nan)
    if not math.isfinite(first):
        return "none" if first == math.inf else "–"
    kinds = [
        f"{name.removeprefix('events_')} ×{int(n)}"
        for name, n in metrics.items()
        if str(name).startswith("events_") and n > 0
    ]
    return f"{first:.3f} ps" + (f" ({', '.join(kinds)})" if kinds else "")


def physics_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per model (the oracle reference last) from the physics stages' long
    tables: lambda, normalised loop work, the MD drift and fluctuation of the oracle
    total energy, the model's own drift, the fraction of stable runs and the first event;
    display strings, – where a model has no value (the oracle has no lambda: it is
    conservative by construction)."""
    if long.empty:
        return pd.DataFrame()
    models = list(dict.fromkeys(m for m in long.model if m != ORACLE_MODEL))
    models += [ORACLE_MODEL] if (long.model == ORACLE_MODEL).any() else []
    rows = []
    for model in models:
        mine = long[long.model == model]
        value = {(r.split, r.metric): float(r.value) for r in mine.itertuples(index=False)}
        row = {"model": model}
        for key, header in PHYSICS_COLUMNS.items():
            row[header] = fmt(value.get(key, math.nan))
        md = mine[mine.split == "md"].set_index("metric")["value"].astype(float)
        row["first event"] = _first_event(md)
        rows.append(row)
    return pd.DataFrame(rows)


def md_settings(long: pd.DataFrame) -> str:
    """``"2 structures × 250 steps of 0.5 fs (0.125 ps) from 450 K"``, from the MD rows."""
    md = long[long.split == "md"]
    if md.empty:
        return ""
    m = md.groupby("metric")["value"].max()
    steps, dt = m.get("steps", math.nan), m.get("timestep_fs", math.nan)
    return (
        f"{m.get('runs', math.nan):.0f} structures × {steps:.0f} steps of {dt:g} fs "
        f"({steps * dt / 1000:g} ps) from {m.get('temperature_K', math.nan):.0f} K"
    )


def _mae_pair(point: dict | None) -> str:
    if point is None:
        return "–"
    return f"{fmt(point['forces_mae'])} / {fmt(point['forces_mae_adsorbate'])}"


def _best(points: dict[str, dict], field: str) -> str:
    scored = {m: p[field] for m, p in points.items() if math.isfinite(p.get(field, math.nan))}
    return min(scored, key=scored.__getitem__) if scored else "–"


def accuracy_tables(results: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The accuracy-against-compute benchmark (``reports/benchmarks/accuracy.json``) as
    two tables: one row per budget with each model's val_id force MAE ``overall /
    adsorbate`` and the best model on each, and one row per ForceNet width at fixed
    compute. Models in the pipeline's order; a model without a point at some budget
    shows –."""
    budgets = results.get("budgets", {}).values()
    found = {p["model"] for p in budgets}
    models = [m for m in MODEL_NAMES if m in found] + sorted(found - set(MODEL_NAMES))
    rows = []
    for factor in sorted({float(p["budget"]) for p in budgets}):
        at = {p["model"]: p for p in budgets if float(p["budget"]) == factor}
        seconds = sorted(p["compute_seconds"] for p in at.values())[len(at) // 2]
        rows.append(
            {
                "budget": f"{factor:g}x",
                "compute [s]": f"{seconds:,.0f}",
                **{m: _mae_pair(at.get(m)) for m in models},
                "best overall": _best(at, "forces_mae"),
                "best adsorbate": _best(at, "forces_mae_adsorbate"),
            }
        )
    widths = sorted(results.get("widths", {}).values(), key=lambda p: p["width"])
    width_rows = [
        {
            "width": f"h{p['width']}",
            "steps": f"{p['steps']:,}",
            "force MAE [eV/Å]": p["forces_mae"],
            "adsorbate force MAE [eV/Å]": p["forces_mae_adsorbate"],
        }
        for p in widths
    ]
    return pd.DataFrame(rows), pd.DataFrame(width_rows)
