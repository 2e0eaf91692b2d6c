"""Comparison report across models: tables (Parquet, CSV, Markdown) and plots (PNG).

Reads the long metrics tables written by :func:`forcenet.evaluate.evaluate_checkpoint`
(``model, split, metric, value, run_id``), optionally the per-atom prediction tables (for
parity plots) and the learning curves: per-epoch metrics of each model's MLflow run (the
``run_id`` column) and/or training history CSVs. Writes into ``out_dir``:

* ``results.parquet`` / ``results.csv``: one row per (model, split), one column per metric;
* ``results.md``: the training budget of each model (steps, seconds, graphs seen), force
  MAE per model × split next to the zero-force baseline, the same for surface (tag 1) and
  adsorbate (tag 2) atoms with the adsorbate MAE per element, then the full comparison
  (cos, magnitude, energy MAE/EFwT where present, rotation-covariance error, throughput);
* ``learning_curves.csv`` (``model, step, metric, value``; for ``dvc plots``);
* ``plots/force_mae_by_split.png``, ``plots/force_mae_by_tag.png``,
  ``plots/learning_curves.png`` (against optimizer steps and against seconds),
  ``plots/parity_<model>.png``.

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forcenet.data import keys as K  # noqa: E402

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
#: Metrics drawn as learning curves (names logged by the training loop at each dev
#: evaluation, against the optimizer step).
CURVE_METRICS = {
    "train_loss": "training loss (model's own definition)",
    "force_mae": "dev force MAE [eV/Å]",
    "force_mae_adsorbate": "dev force MAE, adsorbate atoms [eV/Å]",
}
#: Per-tag groups of the evaluation metrics (suffixes written by forcenet.metrics).
TAG_GROUPS = {"": "all free atoms", "_surface": "surface (tag 1)", "_adsorbate": "adsorbate (tag 2)"}
#: Rows of the training run (forcenet.evaluate.TRAINING_ROWS) and their headers.
TRAINING_SPLIT = "training"
TRAINING_METRICS = {
    "train_steps": "optimizer steps",
    "train_seconds": "seconds",
    "train_graphs_seen": "graphs seen",
    "selected_step": "step of the evaluated checkpoint",
}
#: One colour per model, the same in every plot.
MODEL_COLOURS = {"forcenet": "C0", "schnet": "C1", "dimenetpp": "C2", "gns": "C3"}


def model_colour(model: str) -> str:
    extra = ["C4", "C5", "C6", "C7", "C8", "C9"]
    return MODEL_COLOURS.get(str(model), extra[sum(map(ord, str(model))) % len(extra)])
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


def _split_order(splits) -> list[str]:
    known = [s for s in (*K.VAL_SPLITS, K.TRAIN) if s in set(splits)]
    return known + sorted(set(splits) - set(known))


def comparison_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, split) in split order, the summary metrics as columns (the
    rest after them); a metric evaluated twice keeps its last value. The rows of the
    training run (split ``training``) are not a split and are left out."""
    long = long[long.split != TRAINING_SPLIT]
    wide = long.pivot_table(index=["model", "split"], columns="metric", values="value",
                            aggfunc="last")  # fmt: skip
    wide.columns.name = None
    first = [m for m in SUMMARY_METRICS if m in wide.columns]
    wide = wide[first + sorted(set(wide.columns) - set(first))].reset_index()
    order = {s: i for i, s in enumerate(_split_order(wide.split))}
    wide = wide.sort_values(
        ["split", "model"], key=lambda c: c.map(order) if c.name == "split" else c
    )
    return wide.reset_index(drop=True)


def _fmt(value) -> str:
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
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def force_mae_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """Force MAE with models as rows and splits as columns, plus a zero-force baseline row."""
    splits = _split_order(table.split)
    mat = table.pivot_table(index="model", columns="split", values="forces_mae", aggfunc="last")
    mat = mat.reindex(columns=splits)
    if "zero_forces_mae" in table.columns:
        zero = table.groupby("split")["zero_forces_mae"].first().reindex(splits)
        mat.loc["zero-force baseline"] = zero
    mat.columns.name = None
    return mat.reset_index()


def _with_ratio(mae: pd.Series, zero: pd.Series, digits: int) -> list[str]:
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
        out[f"{label}: MAE (× zero)"] = _with_ratio(
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
        out[el] = _with_ratio(table[prefix + el], table["zero_" + prefix + el], 3)
    return out


def training_table(training: pd.DataFrame) -> pd.DataFrame:
    """Steps, seconds and graphs seen per model (from the ``training`` rows)."""
    if training.empty:
        return pd.DataFrame()
    wide = training.pivot_table(index="model", columns="metric", values="value", aggfunc="last")
    cols = [m for m in TRAINING_METRICS if m in wide.columns]
    return wide[cols].reset_index()


def results_markdown(
    table: pd.DataFrame, plots: Sequence[str], training: pd.DataFrame | None = None
) -> str:
    """The text of ``results.md``."""
    train = training_table(training if training is not None else pd.DataFrame())
    budget = []
    if not train.empty:
        budget = [
            "## Training budget",
            "",
            "Every model trains for a fixed number of optimizer steps (params.yaml "
            "`train.<model>.max_steps`), so a rerun reproduces the weights whatever else the "
            "machine is doing. The seconds are this run's wall clock.",
            "",
            markdown_table(train.map(lambda v: f"{v:,.0f}" if isinstance(v, float) else v),
                           TRAINING_METRICS),  # fmt: skip
            "",
        ]
    tags = per_tag_table(table)
    by_tag = []
    if not tags.empty:
        elements = per_element_table(table)
        by_tag = [
            "## Force MAE by tag [eV/Å]",
            "",
            "Free atoms split by OC20 tag: surface slab atoms (tag 1) and adsorbate atoms "
            "(tag 2). In brackets: the ratio to predicting F = 0 on the same atoms.",
            "",
            markdown_table(tags),
            "",
            "### Adsorbate atoms by element",
            "",
            markdown_table(elements),
            "",
        ]
    parts = [
        "# Results",
        "",
        "Metrics over free atoms (OC20 S2EF convention). The zero-force baseline is the force "
        "MAE of predicting F = 0; the rotation-covariance error is mean |F(x)·R − F(x·R)| over "
        "random rotations R (0 for an exactly covariant model). Throughput is the forward pass "
        "alone.",
        "",
        "## Force MAE [eV/Å] by split",
        "",
        markdown_table(force_mae_matrix(table)) if "forces_mae" in table.columns else "(none)",
        "",
        *by_tag,
        *budget,
        "## All metrics",
        "",
        markdown_table(
            table[["model", "split", *[m for m in SUMMARY_METRICS if m in table.columns]]],
            SUMMARY_METRICS,
        ),
        "",
    ]
    relax = [m for m in RELAX_METRICS if m in table.columns]
    if relax:
        rows = table.dropna(subset=["adwt"]) if "adwt" in relax else table
        parts += [
            "## Relaxations checked by the oracle (EMT)",
            "",
            "Validation systems relaxed with each model (LBFGS), then scored against the "
            "oracle: ADwT (OC20 definition, free atoms, minimum image), FbT-oracle (fraction "
            "whose oracle max force on free atoms is below 0.05 eV/Å) and the oracle energy of "
            "the ML result above the oracle's own minimum.",
            "",
            markdown_table(rows[["model", "split", *relax]], RELAX_METRICS),
            "",
        ]
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- atomic writes


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_frame(path: Path, frame: pd.DataFrame) -> None:
    tmp = _tmp(path)
    try:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_figure(fig, path: Path) -> None:
    tmp = _tmp(path)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- learning curves


def curves_from_mlflow(long: pd.DataFrame, tracking_uri: str | None) -> pd.DataFrame:
    """Training metrics (``model, step, metric, value``) of the runs named in ``long``.

    Without ``tracking_uri`` the default store is read only if its SQLite file exists
    (a report must not create an empty store). Unknown runs are skipped with a warning.
    """
    from forcenet import tracking

    uri = tracking_uri or tracking.default_tracking_uri()
    if tracking_uri is None and uri.startswith("sqlite:///"):
        if not Path(uri.removeprefix("sqlite:///")).is_file():
            return pd.DataFrame(columns=["model", *tracking.HISTORY_COLUMNS])
    frames = []
    runs = long.loc[long.run_id.fillna("") != "", ["model", "run_id"]].drop_duplicates()
    for model, run_id in runs.itertuples(index=False):
        try:
            hist = tracking.epoch_history(run_id, tracking_uri=uri)
        except Exception as exc:  # a run deleted from, or never logged to, this store
            warnings.warn(
                f"learning curves of {model} (run {run_id}) unavailable: {exc}", stacklevel=2
            )
            continue
        frames.append(hist.assign(model=model))
    if not frames:
        return pd.DataFrame(columns=["model", *tracking.HISTORY_COLUMNS])
    return pd.concat(frames, ignore_index=True)[["model", *tracking.HISTORY_COLUMNS]]


def curves_from_csv(paths: Sequence[Path]) -> pd.DataFrame:
    """Training history CSVs with a ``step`` column (optimizer steps) and one column per
    metric; the model is the ``model`` column if present, else the name of the file's
    folder (``checkpoints/<model>/history.csv``)."""
    frames = []
    for path in paths:
        wide = pd.read_csv(path)
        if "step" not in wide.columns:
            raise ValueError(f"{path}: a history CSV needs a 'step' column")
        if "model" not in wide.columns:
            wide["model"] = Path(path).parent.name
        frames.append(wide.melt(id_vars=["model", "step"], var_name="metric", value_name="value"))
    if not frames:
        return pd.DataFrame(columns=["model", "step", "metric", "value"])
    out = pd.concat(frames, ignore_index=True)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out.dropna(subset=["value"])


# --------------------------------------------------------------------------- plots


def plot_force_mae_bars(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars of force MAE per split and model, the zero-force baseline as a black
    tick over each split's group."""
    splits = _split_order(table.split)
    models = sorted(table.model.unique())
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(splits))
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(splits), 4))
    for k, model in enumerate(models):
        rows = table[table.model == model].set_index("split").reindex(splits)
        ax.bar(x - 0.4 + width * (k + 0.5), rows["forces_mae"], width, label=model,
               color=model_colour(model))  # fmt: skip
    if "zero_forces_mae" in table.columns:
        zero = table.groupby("split")["zero_forces_mae"].first().reindex(splits)
        ax.hlines(zero, x - 0.45, x + 0.45, colors="black", linestyles="--",
                  label="zero-force baseline")  # fmt: skip
    ax.set_xticks(x, splits)
    ax.set_ylabel("force MAE on free atoms [eV/Å]")
    ax.set_title("Force MAE by split")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def plot_learning_curves(curves: pd.DataFrame, path: Path) -> bool:
    """Dev force MAE (all free atoms and adsorbate atoms) against optimizer steps and
    against training seconds, and the training loss against steps, one colour per model,
    with the zero-force baselines; False (and no file) when no model has a curve of at
    least two points."""
    curves = curves[curves.step > 0] if "step" in curves.columns else curves
    curves = curves[~curves.metric.isin(["step", "model"])]  # the index, also logged as metrics
    wide = curves.pivot_table(index=["model", "step"], columns="metric", values="value",
                              aggfunc="last").reset_index()  # fmt: skip
    have = [m for m in CURVE_METRICS if m in wide.columns]
    if not have or wide.groupby("model").step.nunique().max() < 2:
        return False
    panels = [(m, "step") for m in have if m != "train_loss"]
    if "elapsed_s" in wide.columns:
        panels += [(m, "elapsed_s") for m in have if m != "train_loss"]
    if "train_loss" in have:
        panels.append(("train_loss", "step"))
    cols = 2 if len(panels) > 1 else 1
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax, (metric, x) in zip(axes.flat, panels, strict=False):
        for model, rows in wide.groupby("model"):
            rows = rows.dropna(subset=[metric, x]).sort_values("step")
            if len(rows) < 1:
                continue
            ax.plot(rows[x], rows[metric], marker="o", markersize=2.5, label=model,
                    color=model_colour(model))  # fmt: skip
        zero = "zero_" + metric
        if metric.startswith("force_mae") and zero in wide.columns:
            ax.axhline(wide[zero].median(), color="black", ls="--", lw=1,
                       label="zero-force baseline")  # fmt: skip
        values = wide[metric].dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer steps" if x == "step" else "training seconds")
        ax.set_ylabel(CURVE_METRICS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Learning curves (dev slice of the training systems)")
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def plot_force_mae_by_tag(table: pd.DataFrame, path: Path) -> bool:
    """Force MAE per split and model for surface and adsorbate atoms (one panel each),
    the zero-force baseline as a dashed tick; False when the data have no tags."""
    groups = [g for g in ("_surface", "_adsorbate") if f"forces_mae{g}" in table.columns]
    if not groups:
        return False
    splits = _split_order(table.split)
    models = sorted(table.model.unique())
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(splits))
    fig, axes = plt.subplots(1, len(groups), figsize=(2 + 3 * len(splits), 3.8), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for k, model in enumerate(models):
            rows = table[table.model == model].set_index("split").reindex(splits)
            ax.bar(x - 0.4 + width * (k + 0.5), rows[f"forces_mae{g}"], width, label=model,
                   color=model_colour(model))  # fmt: skip
        zero = table.groupby("split")[f"zero_forces_mae{g}"].first().reindex(splits)
        ax.hlines(zero, x - 0.45, x + 0.45, colors="black", linestyles="--",
                  label="zero-force baseline")  # fmt: skip
        ax.set_xticks(x, splits, fontsize="small")
        ax.set_title(TAG_GROUPS[g])
        ax.set_ylabel("force MAE on free atoms [eV/Å]")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Force MAE by tag and split")
    _save_figure(fig, path)
    return True


def load_parity(predictions: Sequence[Path], split: str) -> pd.DataFrame:
    """Free-atom force components (true, predicted) of ``split`` from prediction tables;
    if no table has ``split``, the first split found is used instead."""
    cols = ["model", "split", "fixed", "fx", "fy", "fz", "pred_fx", "pred_fy", "pred_fz"]
    frames = [pd.read_parquet(p, columns=cols) for p in predictions]
    if not frames:
        return pd.DataFrame(columns=cols)
    pred = pd.concat(frames, ignore_index=True)
    pred = pred[~pred.fixed.astype(bool)]
    if split not in set(pred.split) and len(pred):
        split = _split_order(pred.split)[0]
    return pred[pred.split == split]


def plot_parity(pred: pd.DataFrame, model: str, path: Path) -> None:
    """Hexbin of predicted vs true force components (free atoms, log counts) with y = x."""
    true = pred[["fx", "fy", "fz"]].to_numpy(float).ravel()
    hat = pred[["pred_fx", "pred_fy", "pred_fz"]].to_numpy(float).ravel()
    ok = np.isfinite(true) & np.isfinite(hat)
    true, hat = true[ok], hat[ok]
    lim = float(np.quantile(np.abs(np.concatenate([true, hat])), 0.999)) if len(true) else 1.0
    lim = max(lim, 1e-3)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    hb = ax.hexbin(true, hat, gridsize=60, bins="log", cmap="viridis",
                   extent=(-lim, lim, -lim, lim), mincnt=1)  # fmt: skip
    fig.colorbar(hb, ax=ax, label="components per bin")
    ax.plot([-lim, lim], [-lim, lim], color="red", lw=0.8, label="y = x")
    mae = float(np.abs(hat - true).mean()) if len(true) else float("nan")
    split = pred.split.iloc[0] if len(pred) else "?"
    ax.set_title(f"{model} on {split} (free atoms)\nforce MAE {mae:.4f} eV/Å", fontsize="medium")
    ax.set_xlabel("reference force component [eV/Å]")
    ax.set_ylabel("predicted force component [eV/Å]")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize="small")
    _save_figure(fig, path)


# --------------------------------------------------------------------------- entry point


def build_report(
    metrics_parquets: Sequence[Path],
    out_dir: Path,
    *,
    tracking_uri: str | None = None,
    predictions: Sequence[Path] = (),
    histories: Sequence[Path] = (),
    parity_split: str = K.VAL_SPLITS[0],
) -> None:
    """Write the comparison tables and plots of all models into ``out_dir`` (see module
    docstring). ``predictions``: per-atom prediction Parquets (parity plots on
    ``parity_split``); learning curves come from the MLflow runs named in the metrics
    tables (store ``tracking_uri``, default the project store) and from ``histories``."""
    out_dir = Path(out_dir)
    long = load_metrics(metrics_parquets)
    training = long[long.split == TRAINING_SPLIT]
    long = long[long.split != TRAINING_SPLIT]
    table = comparison_table(long)
    _write_frame(out_dir / "results.parquet", table)
    _write_frame(out_dir / "results.csv", table)
    plots = []
    if "forces_mae" in table.columns:
        plot_force_mae_bars(table, out_dir / "plots" / "force_mae_by_split.png")
        plots.append("plots/force_mae_by_split.png")
    if plot_force_mae_by_tag(table, out_dir / "plots" / "force_mae_by_tag.png"):
        plots.append("plots/force_mae_by_tag.png")
    curves = pd.concat([curves_from_mlflow(long, tracking_uri), curves_from_csv(histories)],
                       ignore_index=True)  # fmt: skip
    _write_frame(out_dir / "learning_curves.csv", curves)
    if plot_learning_curves(curves, out_dir / "plots" / "learning_curves.png"):
        plots.append("plots/learning_curves.png")
    parity = load_parity(predictions, parity_split)
    for model, rows in parity.groupby("model"):
        name = f"plots/parity_{_safe_name(str(model))}.png"
        plot_parity(rows, str(model), out_dir / name)
        plots.append(name)
    _write_text(out_dir / "results.md", results_markdown(table, plots, training))


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
