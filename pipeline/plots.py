"""The report's figures (PNG): force MAE by split and by tag, learning curves, parity.

One colour per model in every figure (:func:`model_colour`). Each figure is written under
a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from forcenet.atomic import atomic_write  # noqa: E402
from forcenet.data.keys import split_order  # noqa: E402
from pipeline.params import MODEL_NAMES  # noqa: E402

#: Matplotlib's default colour cycle: the models of the pipeline take its colours in order.
PALETTE = tuple(f"C{k}" for k in range(10))
#: Metrics drawn as learning curves (names logged by the training loop at each dev
#: evaluation, against the optimizer step).
CURVE_METRICS = {
    "train_loss": "training loss (model's own definition)",
    "forces_mae": "dev force MAE [eV/Å]",
    "forces_mae_adsorbate": "dev force MAE, adsorbate atoms [eV/Å]",
}
#: Per-tag groups of the evaluation metrics (suffixes written by forcenet.metrics).
TAG_GROUPS = {
    "": "all free atoms",
    "_surface": "surface (tag 1)",
    "_adsorbate": "adsorbate (tag 2)",
}


def model_colour(model: str) -> str:
    """The colour of ``model`` in every figure: its place in :data:`MODEL_NAMES`; any other
    name (the oracle, a benchmark's variant) one of the colours left, picked by its letters."""
    if model in MODEL_NAMES:
        return PALETTE[MODEL_NAMES.index(model) % len(PALETTE)]
    extra = PALETTE[len(MODEL_NAMES) :] or PALETTE
    return extra[sum(map(ord, str(model))) % len(extra)]


def plain_log_ticks(axis, at: list[float] | None = None) -> None:
    """Label a log-scaled ``axis`` with plain numbers: at ``at``, or else at 1, 2 and 5
    times the powers of ten in view; minor ticks stay unlabelled (their "3×10²" labels
    crowd into each other and into the major ones)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(
        FixedLocator(at) if at is not None else LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    )
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _save_figure(fig, path: Path) -> None:
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_force_mae_bars(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars of force MAE per split and model, the zero-force baseline as a black
    tick over each split's group."""
    splits = split_order(table.split)
    models = sorted(table.model.unique())
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(splits))
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(splits), 4))
    for k, model in enumerate(models):
        rows = table[table.model == model].set_index("split").reindex(splits)
        ax.bar(
            x - 0.4 + width * (k + 0.5),
            rows["forces_mae"],
            width,
            label=model,
            color=model_colour(model),
        )
    if "zero_forces_mae" in table.columns:
        zero = table.groupby("split")["zero_forces_mae"].first().reindex(splits)
        ax.hlines(
            zero, x - 0.45, x + 0.45, colors="black", linestyles="--", label="zero-force baseline"
        )
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
    wide = curves.pivot_table(
        index=["model", "step"], columns="metric", values="value", aggfunc="last"
    ).reset_index()
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
            ax.plot(
                rows[x],
                rows[metric],
                marker="o",
                markersize=2.5,
                label=model,
                color=model_colour(model),
            )
        zero = "zero_" + metric
        if metric.startswith("forces_mae") and zero in wide.columns:
            ax.axhline(
                wide[zero].median(), color="black", ls="--", lw=1, label="zero-force baseline"
            )
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
    """Force MAE per split and model for surface and adsorbate atoms (one panel each, one
    above the other), the zero-force baseline as a dashed tick; False when the data have
    no tags."""
    groups = [g for g in ("_surface", "_adsorbate") if f"forces_mae{g}" in table.columns]
    if not groups:
        return False
    splits = split_order(table.split)
    models = sorted(table.model.unique())
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(splits))
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(1.6 + 1.6 * len(splits), 3.4 * len(groups)), squeeze=False
    )
    for ax, g in zip(axes[:, 0], groups, strict=True):
        for k, model in enumerate(models):
            rows = table[table.model == model].set_index("split").reindex(splits)
            ax.bar(
                x - 0.4 + width * (k + 0.5),
                rows[f"forces_mae{g}"],
                width,
                label=model,
                color=model_colour(model),
            )
        zero = table.groupby("split")[f"zero_forces_mae{g}"].first().reindex(splits)
        ax.hlines(
            zero, x - 0.45, x + 0.45, colors="black", linestyles="--", label="zero-force baseline"
        )
        ax.set_xticks(x, splits)
        ax.set_title(TAG_GROUPS[g])
        ax.set_ylabel("force MAE on free atoms [eV/Å]")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Force MAE by tag and split")
    fig.tight_layout()
    _save_figure(fig, path)
    return True


def _components(pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    true = pred[["fx", "fy", "fz"]].to_numpy(float).ravel()
    hat = pred[["pred_fx", "pred_fy", "pred_fz"]].to_numpy(float).ravel()
    ok = np.isfinite(true) & np.isfinite(hat)
    return true[ok], hat[ok]


def plot_parity(pred: pd.DataFrame, model: str, path: Path) -> None:
    """Hexbins of predicted vs reference force components (free atoms, log counts) with
    y = x, one panel per split in OC20 order, on shared axes."""
    splits = split_order(pred.split.unique()) if len(pred) else []
    true_all, hat_all = _components(pred)
    both = np.concatenate([true_all, hat_all])
    lim = max(float(np.quantile(np.abs(both), 0.999)) if len(both) else 1.0, 1e-3)
    cols = max(len(splits), 1)
    fig, axes = plt.subplots(1, cols, figsize=(3.9 * cols, 4.0), squeeze=False)
    for ax, split in zip(axes[0], splits or ["?"], strict=True):
        true, hat = _components(pred[pred.split == split])
        hb = ax.hexbin(
            true,
            hat,
            gridsize=50,
            bins="log",
            cmap="viridis",
            extent=(-lim, lim, -lim, lim),
            mincnt=1,
        )
        ax.plot([-lim, lim], [-lim, lim], color="red", lw=0.8, label="y = x")
        mae = float(np.abs(hat - true).mean()) if len(true) else float("nan")
        ax.set_title(f"{split}\nforce MAE {mae:.4f} eV/Å", fontsize="medium")
        ax.set_xlabel("reference force component [eV/Å]")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("predicted force component [eV/Å]")
    axes[0][0].legend(loc="upper left", fontsize="small")
    fig.colorbar(hb, ax=list(axes[0]), label="components per bin", shrink=0.8)
    fig.suptitle(f"{model}: force parity on free atoms", color=model_colour(model))
    _save_figure(fig, path)
