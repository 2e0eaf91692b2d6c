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

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from forcenet.atomic import atomic_write, write_bytes, write_text
from pipeline import stage
from pipeline.params import MODEL_NAMES
from pipeline.plots import (
    plot_force_mae_bars,
    plot_force_mae_by_tag,
    plot_learning_curves,
    plot_parity,
)
from pipeline.stage import HISTORY_FILE
from pipeline.summary import (
    RELAX_METRICS,
    SUMMARY_METRICS,
    TRAINING_METRICS,
    TRAINING_SPLIT,
    comparison_table,
    counts_as_integers,
    force_mae_matrix,
    load_metrics,
    markdown_table,
    per_element_table,
    per_tag_table,
    training_table,
    under_trained,
)

#: The oracle-energy trace the relax stage writes into its folder.
RELAX_TRACE = "relax_oracle_energy.png"


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
            markdown_table(counts_as_integers(rows[["model", "split", *relax]]), RELAX_METRICS),
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
