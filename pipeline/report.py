"""Stage ``report``: the comparison across models, as tables and plots.

Reads, for every model of the pipeline (:data:`pipeline.params.MODEL_NAMES`), the long
metrics tables of the evaluate and relax stages (``model, split, metric, value, run_id``;
``run_id`` is empty in the tables the stages write now),
the per-atom predictions (parity plots) and the learning curve ``history.csv`` of its
training folder. Writes into ``--out``:

* ``results.parquet`` / ``results.csv``: one row per (model, split), one column per metric;
* ``results.md`` (its words are :data:`RESULTS_TEMPLATE`): the training budget of each
  model (steps, seconds, graphs seen), force MAE per model × split next to the
  zero-force baseline, the same for surface (tag 1) and adsorbate (tag 2) atoms with the
  adsorbate MAE per element, then the full comparison
  (cos, magnitude, energy MAE/EFwT where present, rotation-covariance error, throughput);
  then the relaxations checked by the oracle, the hybrid relaxations (ML, then the
  oracle) against oracle-only ones, the physics checks (lambda, NVE MD judged by the
  oracle, with the oracle's own run as the reference), and, with ``--accuracy``, the
  accuracy-against-compute benchmark (``benchmarks/bench_accuracy.py``: force MAE per
  model and step budget, the best model at each, ForceNet's width at fixed compute);
* ``learning_curves.csv`` (``model, step, metric, value``; for ``dvc plots``);
* the figures of :mod:`pipeline.plots` under ``plots/``, each model's relaxation trace and
  the MD energy of every model and the oracle (``plots/md_energy.png``) and the
  benchmark's figure (``plots/accuracy_vs_compute.png``).

Every file is written under a temporary name and renamed when complete.

The seconds and throughput shown come from the timing files of the stages
(``--timing``, :mod:`pipeline.timing`), which no stage depends on; a model without one is
named in ``results.md``, its seconds shown as –. ``results.parquet``/``.csv`` and
``learning_curves.csv`` hold results only (the throughput of tables written before the
timing files is kept where it is found).

    python -m pipeline.report --eval reports/eval --relax reports/relax \
        --predictions data/predictions --models data/models --relax-runs data/relax \
        --physics reports/physics --physics-runs data/physics \
        --accuracy reports/benchmarks/accuracy.json --timing reports/timing --out reports
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
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
    HYBRID_METRICS,
    ORACLE_MODEL,
    RELAX_METRICS,
    SUMMARY_METRICS,
    TRAINING_METRICS,
    TRAINING_SPLIT,
    accuracy_tables,
    comparison_table,
    counts_as_integers,
    fmt,
    force_mae_matrix,
    hybrid_table,
    load_metrics,
    markdown_table,
    md_settings,
    per_element_table,
    per_tag_table,
    physics_table,
    training_table,
    under_trained,
)
from pipeline.timing import read_timing, timing_path

#: The oracle-energy trace the relax stage writes into its folder.
RELAX_TRACE = "relax_oracle_energy.png"
#: The report's MD figure, drawn from the time series (forcenet.physics.md.MD_SERIES)
#: the physics stages write into their folders.
REPORT_MD_PLOT = "plots/md_energy.png"
#: The accuracy-against-compute figure of benchmarks/bench_accuracy.py, as copied.
ACCURACY_PLOT = "plots/accuracy_vs_compute.png"


#: The template of ``results.md``: its words; this module computes what fills it.
RESULTS_TEMPLATE = Path(__file__).parent / "templates" / "results.md.j2"


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(RESULTS_TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,  # a name the template misspells is an error
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    return env.get_template(RESULTS_TEMPLATE.name)


def _budget(training: pd.DataFrame, notes: Sequence[str]) -> dict | None:
    train = training_table(training)
    if train.empty:
        return None
    return {
        "table": markdown_table(train, TRAINING_METRICS),
        "notes": list(notes),
        "weak": under_trained(training),
    }


def _tags(forces: pd.DataFrame) -> dict | None:
    tags = per_tag_table(forces)
    if tags.empty:
        return None
    return {"table": markdown_table(tags), "elements": markdown_table(per_element_table(forces))}


def _step_limits(table: pd.DataFrame, column: str) -> str:
    """The distinct step limits of ``column`` (``"60"``, ``"60, 200"``), – when absent."""
    if column not in table.columns:
        return "–"
    return ", ".join(f"{v:.0f}" for v in sorted(table[column].dropna().unique())) or "–"


def _relax(table: pd.DataFrame) -> dict | None:
    relax = [m for m in RELAX_METRICS if m in table.columns]
    if not relax:
        return None
    rows = table.dropna(subset=["adwt"]) if "adwt" in relax else table
    limits = _step_limits(rows, "ml_steps_limit")
    return {
        "ml_limits": "" if limits == "–" else limits,  # none in tables from before the limit
        "overall": bool((rows.split == "overall").any()),
        "table": markdown_table(
            counts_as_integers(rows[["model", "split", *relax]]), RELAX_METRICS
        ),
    }


def _hybrid(table: pd.DataFrame) -> dict | None:
    hybrid = hybrid_table(table)
    if hybrid.empty:
        return None
    return {
        "ml_limits": _step_limits(table, "ml_steps_limit"),
        "oracle_limits": _step_limits(table, "oracle_steps_limit"),
        "table": markdown_table(hybrid, HYBRID_METRICS),
    }


def _physics(physics: pd.DataFrame, plots: Sequence[str]) -> dict | None:
    table = physics_table(physics)
    if table.empty:
        return None
    return {
        "md_settings": md_settings(physics),
        "oracle": ORACLE_MODEL,
        "table": markdown_table(table),
        "plot": REPORT_MD_PLOT if REPORT_MD_PLOT in plots else None,
    }


def _accuracy(accuracy: dict | None, plots: Sequence[str]) -> dict | None:
    if not accuracy:
        return None
    budgets, widths = accuracy_tables(accuracy)
    if budgets.empty and widths.empty:
        return None
    zero = accuracy.get("zero_baseline", {})
    has_zero = {"zero_forces_mae", "zero_forces_mae_adsorbate"} <= zero.keys()
    return {
        "zero": fmt(zero["zero_forces_mae"]) if has_zero else None,
        "zero_adsorbate": fmt(zero["zero_forces_mae_adsorbate"]) if has_zero else None,
        "budgets": "" if budgets.empty else markdown_table(budgets),
        "widths": "" if widths.empty else markdown_table(widths),
        "plot": ACCURACY_PLOT if ACCURACY_PLOT in plots else None,
    }


#: Columns of the training-options table: (JSON field, header).
OPTION_COLUMNS = (
    ("steps", "steps"),
    ("dev_forces_mae", "dev MAE"),
    ("dev_forces_mae_adsorbate", "dev MAE, adsorbate"),
    ("val_id_forces_mae", "val_id MAE"),
    ("val_id_forces_mae_adsorbate", "val_id MAE, adsorbate"),
    ("rotation_covariance_error", "rotation covariance error"),
    ("lambda", "λ"),
)


def options_table(options: dict) -> pd.DataFrame:
    """One row per option set of ``benchmarks/bench_options.py``'s JSON; a ValueError
    names an entry that lacks a field."""
    rows = []
    for k, entry in enumerate(options.get("entries", [])):
        missing = [
            f for f in ("model", "options", *(c for c, _ in OPTION_COLUMNS)) if f not in entry
        ]
        if missing:
            raise ValueError(f"training options entry {k} ({entry.get('key', '?')}): no {missing}")
        chosen = ", ".join(f"{key}={value}" for key, value in entry["options"].items())
        row = {"model": entry["model"], "options": chosen or "(recipe of params.yaml)"}
        row.update({header: entry[field] for field, header in OPTION_COLUMNS})
        rows.append(row)
    return pd.DataFrame(rows)


def _options(options: dict | None) -> dict | None:
    if not options:
        return None
    table = options_table(options)
    if table.empty:
        return None
    best = table[table.model == "forcenet"].sort_values("dev MAE").head(1)
    return {
        "cpu": dict(options.get("machine", {})).get("cpu"),
        "threads": options.get("threads", "?"),
        "choice": best.iloc[0]["options"] if len(best) else None,
        "table": markdown_table(table),
    }


def results_markdown(
    table: pd.DataFrame,
    plots: Sequence[str],
    training: pd.DataFrame | None = None,
    physics: pd.DataFrame | None = None,
    accuracy: dict | None = None,
    timing_notes: Sequence[str] = (),
    options: dict | None = None,
) -> str:
    """The text of ``results.md``: :data:`RESULTS_TEMPLATE` filled in. ``table``:
    :func:`comparison_table` of the evaluation and relaxation metrics (with the throughput
    to show); ``physics``: the physics stages' long tables; ``accuracy``: the
    accuracy-against-compute benchmark's JSON; ``timing_notes``: the timing files that
    were missing, said under the budget; ``options``: the training-options benchmark's
    JSON."""
    has_forces = "forces_mae" in table.columns
    forces = table.dropna(subset=["forces_mae"]) if has_forces else table
    shown = [m for m in SUMMARY_METRICS if m in forces.columns]
    in_sections = (REPORT_MD_PLOT, ACCURACY_PLOT)  # shown in their own sections
    return _template().render(
        force_matrix=markdown_table(force_mae_matrix(forces)) if has_forces else None,
        tags=_tags(forces),
        budget=_budget(training if training is not None else pd.DataFrame(), timing_notes),
        all_metrics=markdown_table(forces[["model", "split", *shown]], SUMMARY_METRICS),
        relax=_relax(table),
        hybrid=_hybrid(table),
        physics=_physics(physics if physics is not None else pd.DataFrame(), plots),
        accuracy=_accuracy(accuracy, plots),
        options=_options(options),
        plots=[(Path(p).stem, p) for p in plots if p not in in_sections],
    )


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


def _force_plots(table: pd.DataFrame, out_dir: Path) -> list[str]:
    """The force-MAE bars by split and by tag (rows with a force MAE); their paths."""
    if "forces_mae" not in table.columns:
        return []
    forces = table.dropna(subset=["forces_mae"])
    plots = []
    plot_force_mae_bars(forces, out_dir / "plots" / "force_mae_by_split.png")
    plots.append("plots/force_mae_by_split.png")
    if plot_force_mae_by_tag(forces, out_dir / "plots" / "force_mae_by_tag.png"):
        plots.append("plots/force_mae_by_tag.png")
    return plots


def _md_plot(series: Sequence[Path], out_dir: Path) -> list[str]:
    """The oracle total energy of every MD run, one panel per model (from the physics
    stages' time series), as :data:`REPORT_MD_PLOT`; its path, none without series."""
    if not series:
        return []
    from forcenet.physics.md import plot_md_energy

    plot_md_energy(pd.concat([pd.read_parquet(p) for p in series]), out_dir / REPORT_MD_PLOT)
    return [REPORT_MD_PLOT]


def _timing_frames(
    models: Sequence[str], folder: Path | None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """From the timing files in ``folder``: the long rows to show (``train_seconds``,
    split ``training``; throughput per split), the seconds of each learning-curve point
    (``model, step, metric, value``) and a note per missing file."""
    rows: list[tuple[str, str, str, float]] = []
    curve: list[tuple[str, int, str, float]] = []
    if folder is None:
        return _long_frame(rows), _curve_frame(curve), []
    missing = []
    for model in models:
        train = read_timing(timing_path(folder, "train", model))
        if train is None:
            missing.append(str(timing_path(folder, "train", model)))
        else:
            seconds = train.get("train_seconds")
            if isinstance(seconds, int | float):
                rows.append((model, TRAINING_SPLIT, "train_seconds", float(seconds)))
            for point in train.get("curve", []):
                if isinstance(point, dict) and isinstance(point.get("elapsed_s"), int | float):
                    curve.append((model, int(point["step"]), "elapsed_s", point["elapsed_s"]))
        evaluate = read_timing(timing_path(folder, "evaluate", model))
        if evaluate is None:
            missing.append(str(timing_path(folder, "evaluate", model)))
            continue
        for split, values in dict(evaluate.get("splits", {})).items():
            if split == TRAINING_SPLIT:  # the train stage's file says how long training took
                continue
            for metric, value in dict(values).items():
                if isinstance(value, int | float):
                    rows.append((model, str(split), str(metric), float(value)))
    notes = [f"No timing file {path}: its seconds or throughput show –." for path in missing]
    return _long_frame(rows), _curve_frame(curve), notes


def _long_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["model", "split", "metric", "value"])


def _curve_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["model", "step", "metric", "value"])


def build_report(
    metrics_parquets: Sequence[Path],
    out_dir: Path,
    *,
    predictions: Sequence[Path] = (),
    histories: Sequence[Path] = (),
    relax_plots: Mapping[str, Path] | None = None,
    physics: Sequence[Path] = (),
    md_series: Sequence[Path] = (),
    accuracy: Path | None = None,
    accuracy_plot: Path | None = None,
    timing: Path | None = None,
    options: Path | None = None,
) -> str:
    """Write the comparison tables and plots of all models into ``out_dir`` (see module
    docstring); returns the text of ``results.md``. ``predictions``: per-atom prediction
    Parquets (parity plots, every split); ``histories``: learning-curve CSVs;
    ``relax_plots``: each model's oracle-energy trace of its relaxations (copied);
    ``physics``: the physics stages' long tables (the models' and the oracle's);
    ``md_series``: their MD time series, drawn in that order; ``accuracy``: the JSON of
    ``benchmarks/bench_accuracy.py`` and ``accuracy_plot`` its figure (copied);
    ``timing``: the folder of the stages' timing files (seconds, throughput), shown in
    ``results.md`` only; ``options``: the JSON of ``benchmarks/bench_options.py``."""
    out_dir = Path(out_dir)
    long = load_metrics(metrics_parquets)
    clock, clock_curves, notes = _timing_frames(list(dict.fromkeys(long.model)), timing)
    training = long[long.split == TRAINING_SPLIT]
    training = pd.concat([training, clock[clock.split == TRAINING_SPLIT]], ignore_index=True)
    long = long[long.split != TRAINING_SPLIT]
    table = comparison_table(long)
    _write_frame(out_dir / "results.parquet", table)
    _write_frame(out_dir / "results.csv", table)
    shown = comparison_table(pd.concat([long, clock[clock.split != TRAINING_SPLIT]]))
    plots = _force_plots(table, out_dir)
    curves = curves_from_csv(histories)
    _write_frame(out_dir / "learning_curves.csv", curves)
    drawn = pd.concat([curves, clock_curves], ignore_index=True) if len(clock_curves) else curves
    if plot_learning_curves(drawn, out_dir / "plots" / "learning_curves.png"):
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
    plots += _md_plot(md_series, out_dir)
    if accuracy_plot is not None:
        write_bytes(out_dir / ACCURACY_PLOT, Path(accuracy_plot).read_bytes())
        plots.append(ACCURACY_PLOT)
    physics_long = load_metrics(physics) if physics else pd.DataFrame()
    bench = _read_accuracy(accuracy) if accuracy is not None else None
    chosen = _read_json(options, "training options benchmark") if options is not None else None
    text = results_markdown(shown, plots, training, physics_long, bench, notes, chosen)
    write_text(out_dir / "results.md", text)
    return text


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable {what} JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a {what} JSON (top level is not an object)")
    return data


def _read_accuracy(path: Path) -> dict:
    """The benchmark JSON, checked for the fields the report reads."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable accuracy benchmark JSON: {err}") from err
    need = {
        "budgets": ("model", "budget", "compute_seconds", "forces_mae", "forces_mae_adsorbate"),
        "widths": ("width", "steps", "forces_mae", "forces_mae_adsorbate"),
    }
    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(results).__name__}")
    for group, fields in need.items():
        points = results.get(group, {})
        if not isinstance(points, dict):
            raise ValueError(f"{path}: {group!r} is not an object")
        for key, point in points.items():
            missing = [f for f in fields if not isinstance(point, dict) or f not in point]
            if missing:
                raise ValueError(f"{path}: point {group}/{key} lacks {', '.join(missing)}")
    return results


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
    p.add_argument(
        "--physics", type=Path, help="folder of <model>.parquet and oracle.parquet physics metrics"
    )
    p.add_argument("--physics-runs", type=Path, help="folder of <model>/md_series.parquet")
    p.add_argument(
        "--accuracy",
        type=Path,
        help="benchmarks/bench_accuracy.py's JSON (with its figure beside it, if drawn)",
    )
    p.add_argument(
        "--timing", type=Path, help="folder of the stages' timing files (seconds, throughput)"
    )
    p.add_argument(
        "--options", type=Path, help="benchmarks/bench_options.py's JSON (training options)"
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
    runs = [*MODEL_NAMES, ORACLE_MODEL]  # the MD plot's panels, the reference last
    physics: list[Path] = []
    if args.physics is not None:
        physics = [p for m in runs if (p := args.physics / f"{m}.parquet").is_file()]
    series: list[Path] = []
    if args.physics_runs is not None:
        from forcenet.physics.md import MD_SERIES

        series = [p for m in runs if (p := args.physics_runs / m / MD_SERIES).is_file()]
    accuracy = None
    if args.accuracy is not None:
        accuracy = _existing([args.accuracy], "accuracy benchmark")[0]
    text = build_report(
        tables,
        args.out,
        predictions=predictions,
        histories=histories,
        relax_plots=traces,
        physics=physics,
        md_series=series,
        accuracy=accuracy,
        accuracy_plot=_accuracy_plot(args.accuracy),
        timing=args.timing,
        options=_existing([args.options], "training options benchmark")[0]
        if args.options is not None
        else None,
    )
    print(text)


def _accuracy_plot(accuracy: Path | None) -> Path | None:
    """The figure the benchmark draws beside its JSON, if there is one."""
    if accuracy is None:
        return None
    plot = accuracy.with_name("accuracy_vs_compute.png")
    return plot if plot.is_file() else None


if __name__ == "__main__":
    stage.run(main)
