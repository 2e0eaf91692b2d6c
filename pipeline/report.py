"""Stage ``report``: the comparison across models, as tables and plots.

Reads, for every model of the pipeline (:data:`pipeline.params.MODEL_NAMES`), the long
metrics tables of the evaluate and relax stages (``model, split, metric, value, run_id``),
the per-atom predictions (parity plots) and the learning curve ``history.csv`` of its
training folder. Writes into ``--out``:

* ``results.parquet`` / ``results.csv``: one row per (model, split), one column per metric;
* ``results.md``: the training budget of each model (steps, seconds, graphs seen), force
  MAE per model × split next to the zero-force baseline, the same for surface (tag 1) and
  adsorbate (tag 2) atoms with the adsorbate MAE per element, then the full comparison
  (cos, magnitude, energy MAE/EFwT where present, rotation-covariance error, throughput);
* ``learning_curves.csv`` (``model, step, metric, value``; for ``dvc plots``);
* the figures of :mod:`pipeline.plots` under ``plots/``.

Every file is written under a temporary name and renamed when complete.

    python -m pipeline.report --eval reports/eval --relax reports/relax \
        --predictions data/predictions --models data/models --out reports
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from forcenet.atomic import atomic_write, write_bytes, write_text
from pipeline import stage
from pipeline.params import MODEL_NAMES
from pipeline.plots import (
    TAG_GROUPS,
    plot_force_mae_bars,
    plot_force_mae_by_tag,
    plot_learning_curves,
    plot_parity,
    split_order,
)
from pipeline.stage import HISTORY_FILE

#: The oracle-energy trace the relax stage writes into its folder.
RELAX_TRACE = "relax_oracle_energy.png"

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
    splits = split_order(table.split)
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


def _counts_as_integers(table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    for col in COUNT_METRICS:
        if col in out.columns:
            out[col] = [f"{v:,.0f}" if math.isfinite(v) else "–" for v in out[col]]
    return out


def under_trained(training: pd.DataFrame) -> list[str]:
    """Models whose training saw less than one pass over the training frames."""
    rows = training[(training.metric == "train_epochs") & (training.value < MIN_EPOCHS)]
    return sorted(rows.model.unique())


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
            markdown_table(train, TRAINING_METRICS),
            "",
        ]
        weak = under_trained(training if training is not None else pd.DataFrame())
        if weak:
            budget += [
                f"**Warning: {', '.join(weak)} saw less than one pass over the training data;** "
                "its metrics describe an under-trained model. Raise `train.<model>.max_steps` "
                "(or lower the model's size) before comparing it.",
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
            markdown_table(_counts_as_integers(rows[["model", "split", *relax]]), RELAX_METRICS),
            "",
        ]
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- learning curves


def _write_frame(path: Path, frame: pd.DataFrame) -> None:
    with atomic_write(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)


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


def load_parity(predictions: Sequence[Path]) -> pd.DataFrame:
    """Free-atom force components (reference, predicted) of every split, from the
    prediction tables."""
    cols = ["model", "split", "fixed", "fx", "fy", "fz", "pred_fx", "pred_fy", "pred_fz"]
    frames = [pd.read_parquet(p, columns=cols) for p in predictions]
    if not frames:
        return pd.DataFrame(columns=cols)
    pred = pd.concat(frames, ignore_index=True)
    return pred[~pred.fixed.astype(bool)]


# --------------------------------------------------------------------------- entry point


def build_report(
    metrics_parquets: Sequence[Path],
    out_dir: Path,
    *,
    predictions: Sequence[Path] = (),
    histories: Sequence[Path] = (),
    relax_plots: Mapping[str, Path] | None = None,
) -> str:
    """Write the comparison tables and plots of all models into ``out_dir`` (see module
    docstring); returns the text of ``results.md``. ``predictions``: per-atom prediction
    Parquets (parity plots, every split); ``histories``: learning-curve CSVs;
    ``relax_plots``: each model's oracle-energy trace of its relaxations (copied)."""
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
    curves = curves_from_csv(histories)
    _write_frame(out_dir / "learning_curves.csv", curves)
    if plot_learning_curves(curves, out_dir / "plots" / "learning_curves.png"):
        plots.append("plots/learning_curves.png")
    parity = load_parity(predictions)
    for model, rows in parity.groupby("model"):
        name = f"plots/parity_{_safe_name(str(model))}.png"
        plot_parity(rows, str(model), out_dir / name)
        plots.append(name)
    for model, png in (relax_plots or {}).items():
        name = f"plots/relax_{_safe_name(model)}.png"
        write_bytes(out_dir / name, Path(png).read_bytes())
        plots.append(name)
    text = results_markdown(table, plots, training)
    write_text(out_dir / "results.md", text)
    return text


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _existing(paths: Sequence[Path], what: str) -> list[Path]:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {what}: {', '.join(map(str, missing))}")
    return list(paths)


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--eval", type=Path, required=True, help="folder of <model>.parquet metrics")
    p.add_argument("--relax", type=Path, help="folder of <model>.parquet relaxation metrics")
    p.add_argument("--predictions", type=Path, help="folder of <model>.parquet predictions")
    p.add_argument("--models", type=Path, help="folder of <model>/history.csv learning curves")
    p.add_argument(
        "--relax-runs", type=Path, help="folder of <model>/relax_oracle_energy.png traces"
    )
    p.add_argument("--out", type=Path, required=True, help="report folder")
    args = p.parse_args(argv)
    tables = _existing([args.eval / f"{m}.parquet" for m in MODEL_NAMES], "evaluation tables")
    if args.relax is not None:  # none when the data have no oracle to relax against
        tables += [p for m in MODEL_NAMES if (p := args.relax / f"{m}.parquet").is_file()]
    predictions: list[Path] = []
    if args.predictions is not None:
        files = [args.predictions / f"{m}.parquet" for m in MODEL_NAMES]
        predictions = _existing(files, "prediction tables")
    histories: list[Path] = []
    if args.models is not None:
        files = [args.models / m / HISTORY_FILE for m in MODEL_NAMES]
        histories = _existing(files, "learning curves")
    traces: dict[str, Path] = {}
    if args.relax_runs is not None:
        traces = {m: p for m in MODEL_NAMES if (p := args.relax_runs / m / RELAX_TRACE).is_file()}
    text = build_report(
        tables, args.out, predictions=predictions, histories=histories, relax_plots=traces
    )
    print(text)


if __name__ == "__main__":
    stage.run(main)
