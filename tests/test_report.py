"""The comparison report from synthetic metrics, predictions and learning curves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from forcenet.tables import TABLE_COLUMNS, write_table
from pipeline import plots, report, summary

SPLITS = ["val_ood_both", "val_id", "val_ood_ads", "val_ood_cat"]  # deliberately unordered
ZERO = {"val_id": 0.50, "val_ood_ads": 0.55, "val_ood_cat": 0.60, "val_ood_both": 0.65}
MAE = {"forcenet": 0.08, "schnet": 0.12, "gns": 0.10}


def _long(model: str, run_id: str) -> pd.DataFrame:
    rows = []
    for k, split in enumerate(SPLITS):
        metrics = {
            "forces_mae": MAE[model] + 0.01 * k,
            "zero_forces_mae": ZERO[split],
            "forces_cos": 0.5,
            "forces_magnitude": 0.1,
            "rotation_covariance_mae": 0.0 if model == "schnet" else 0.02,
            "inference_graphs_per_s": 1234.5,
            "inference_atoms_per_s": 80000.0,
        }
        if model == "schnet":
            metrics |= {"energy_mae": 0.4, "energy_force_within_threshold": 0.0}
        for tag, factor in (("surface", 0.5), ("adsorbate", 2.0)):
            metrics |= {
                f"forces_mae_{tag}": factor * metrics["forces_mae"],
                f"zero_forces_mae_{tag}": factor * ZERO[split],
                f"forces_cos_{tag}": 0.4,
                f"forces_magnitude_{tag}": 0.1,
            }
        metrics |= {"forces_mae_adsorbate_C": 0.3, "zero_forces_mae_adsorbate_C": 0.6}
        rows += [(model, split, m, v, run_id) for m, v in metrics.items()]
    training = {
        "train_steps": 1000.0 + len(model),
        "train_seconds": 150.0,
        "train_graphs_seen": 16000.0,
        "selected_step": 900.0,
        "train_epochs": 0.5 if model == "gns" else 3.0,
        "parameters": 12345.0,
    }
    rows += [(model, "training", m, v, run_id) for m, v in training.items()]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _predictions(model: str, rng) -> pd.DataFrame:
    n = 400
    true = rng.normal(scale=0.5, size=(n, 3)).astype(np.float32)
    pred = (true + rng.normal(scale=MAE[model], size=(n, 3))).astype(np.float32)
    return pd.DataFrame(
        {
            "model": model,
            "split": np.where(np.arange(n) < 300, "val_id", "val_ood_ads"),
            "sid": np.arange(n) // 20,
            "fid": 0,
            "atom": np.arange(n) % 20,
            "atomic_number": 29,
            "tag": 1,
            "fixed": np.arange(n) % 5 == 0,
            "fx": true[:, 0],
            "fy": true[:, 1],
            "fz": true[:, 2],
            "pred_fx": pred[:, 0],
            "pred_fy": pred[:, 1],
            "pred_fz": pred[:, 2],
        }
    )


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Metrics and predictions of three models; the learning curves of two of them, as
    the train stage writes them (history.csv in the model's output folder)."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = np.random.default_rng(0)
    metrics, preds = [], []
    for model in MAE:
        path = tmp_path / "metrics" / f"{model}.parquet"
        write_table(_long(model, "0123abcd" if model == "forcenet" else ""), path)
        metrics.append(path)
        ppath = tmp_path / "preds" / f"{model}.parquet"
        write_table(_predictions(model, rng), ppath)
        preds.append(ppath)
    history = tmp_path / "checkpoints" / "gns" / "history.csv"
    history.parent.mkdir(parents=True)
    pd.DataFrame(
        {"step": [100, 200, 300], "train_loss": [2.0, 1.0, 0.7], "forces_mae": [0.4, 0.3, 0.25]}
    ).to_csv(history, index=False)
    fn_history = tmp_path / "checkpoints" / "forcenet" / "history.csv"
    fn_history.parent.mkdir(parents=True)
    pd.DataFrame(
        {
            "model": "forcenet",
            "step": [50, 100, 150, 200],
            "elapsed_s": [5.0, 10.0, 15.0, 20.0],
            "train_loss": [1.0 / (e + 1) for e in range(4)],
            "forces_mae": [0.3 - 0.05 * e for e in range(4)],
        }
    ).to_csv(fn_history, index=False)
    return {"metrics": metrics, "preds": preds, "history": [history, fn_history]}


def test_build_report_tables_and_plots(inputs, tmp_path):
    out = tmp_path / "reports"
    report.build_report(
        inputs["metrics"], out, predictions=inputs["preds"], histories=inputs["history"]
    )
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 3 * 4
    # splits in OC20 order, summary metrics first
    assert table.split.unique().tolist() == ["val_id", "val_ood_ads", "val_ood_cat", "val_ood_both"]
    assert table.columns[2:5].tolist() == ["forces_mae", "zero_forces_mae", "forces_cos"]
    row = table[(table.model == "schnet") & (table.split == "val_ood_cat")].iloc[0]
    assert row.forces_mae == pytest.approx(0.12 + 0.01 * SPLITS.index("val_ood_cat"))
    assert row.energy_mae == pytest.approx(0.4)
    assert np.isnan(table[table.model == "gns"].energy_mae).all()  # no energy -> empty cell
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table, check_dtype=False)

    md = (out / "results.md").read_text()
    baseline = next(line for line in md.splitlines() if line.startswith("| zero-force baseline"))
    assert baseline == "| zero-force baseline | 0.5000 | 0.5500 | 0.6000 | 0.6500 |"
    assert "| gns | val_id | 0.1100 |" in md  # val_id is SPLITS[1] -> 0.10 + 0.01
    assert "EFwT" in md and "–" in md  # EFwT column exists; missing values shown as –

    curves = pd.read_csv(out / "learning_curves.csv")
    assert set(curves.model) == {"forcenet", "gns"}
    fn = curves[(curves.model == "forcenet") & (curves.metric == "train_loss")].sort_values("step")
    assert fn.value.tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.25])

    # per-tag table: MAE with its ratio to the tag's own zero baseline; per element
    assert "adsorbate (tag 2): MAE (× zero)" in md
    ads = 2.0 * (MAE["gns"] + 0.01)  # gns on val_id (SPLITS[1])
    assert f"{ads:.4f} ({ads / (2.0 * ZERO['val_id']):.2f}×)" in md
    assert "### Adsorbate atoms by element" in md and "0.300 (0.50×)" in md
    # training budget: steps, seconds and graphs per model; not a split of the tables
    assert "## Training budget" in md
    assert "| gns | 12,345 | 1,003 | 0.50 ⚠ under-trained | 150 | 16,000 | 900 |" in md
    assert "| schnet | 12,345 | 1,006 | 3.00 | 150 | 16,000 | 900 |" in md
    assert "**Warning: gns saw less than one pass over the training data;**" in md
    assert "training" not in set(table.split)

    for name in [
        "force_mae_by_split",
        "force_mae_by_tag",
        "learning_curves",
        "parity_forcenet",
        "parity_schnet",
        "parity_gns",
    ]:
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"plots/{name}.png" in md
    assert not list(out.rglob(".*tmp"))


def test_seconds_and_throughput_come_from_the_timing_files(tmp_path):
    """Tables written by the stages hold results only; the report shows the training
    seconds and the throughput from the timing files (results.md only: results.parquet
    stays results only), and names a missing timing file instead of failing."""
    from pipeline.timing import CLOCK_METRICS, timing_path, without_clock, write_timing

    paths = []
    for model in ("forcenet", "gns"):
        path = tmp_path / "eval" / f"{model}.parquet"
        write_table(without_clock(_long(model, "0123abcd")), path)
        paths.append(path)
    timing = tmp_path / "timing"
    write_timing(
        timing_path(timing, "train", "forcenet"),
        {"train_seconds": 4321.0, "curve": [{"step": 50, "elapsed_s": 5.0}]},
    )
    write_timing(
        timing_path(timing, "evaluate", "forcenet"),
        {"splits": {s: {"inference_graphs_per_s": 777.0} for s in SPLITS}},
    )
    out = tmp_path / "reports"
    md = report.build_report(paths, out, timing=timing)
    assert "| forcenet | 12,345 | 1,008 | 3.00 | 4,321 | 16,000 | 900 |" in md
    assert "| gns | 12,345 | 1,003 | 0.50 ⚠ under-trained | – | 16,000 | 900 |" in md
    lines = md.splitlines()
    header = lines[lines.index("## All metrics") + 2]
    assert header.endswith("| graphs/s |")  # no atoms/s: the timing file has none
    assert "| forcenet | val_id | 0.0900 | 0.5000 | 0.5000 | 0.1000 | 0.0200 | 777 |" in md
    assert "| gns | val_id | 0.1100 | 0.5000 | 0.5000 | 0.1000 | 0.0200 | – |" in md
    for stage in ("train", "evaluate"):
        assert f"No timing file {timing_path(timing, stage, 'gns')}" in md
    table = pd.read_parquet(out / "results.parquet")
    assert not set(CLOCK_METRICS) & set(table.columns)
    # without a timing folder: no seconds, no error
    md = report.build_report(paths, tmp_path / "bare")
    assert "| forcenet | 12,345 | 1,008 | 3.00 | 16,000 | 900 |" in md


def test_relaxation_table_and_traces(inputs, tmp_path):
    """Counts print as integers, and each model's oracle-energy trace lands in plots/."""
    rows = [
        ("gns", split, m, v, "")
        for split in ("val_id", "val_ood_ads")
        for m, v in (("relax_systems", 3.0), ("adwt", 0.25), ("fbt_oracle", 0.0))
    ]
    relax = tmp_path / "relax.parquet"
    write_table(pd.DataFrame(rows, columns=TABLE_COLUMNS), relax)
    trace = tmp_path / "trace.png"
    trace.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    out = tmp_path / "reports"
    md = report.build_report([*inputs["metrics"], relax], out, relax_plots={"gns": trace})
    assert "| gns | val_id | 3 | 0.2500 | 0.0000 |" in md
    assert (out / "plots" / "relax_gns.png").read_bytes() == trace.read_bytes()
    assert "plots/relax_gns.png" in md


def test_force_mae_matrix_and_markdown_formatting():
    table = summary.comparison_table(pd.concat([_long("forcenet", ""), _long("gns", "")]))
    mat = summary.force_mae_matrix(table)
    assert mat.model.tolist() == ["forcenet", "gns", "zero-force baseline"]
    assert mat.columns.tolist()[1:] == ["val_id", "val_ood_ads", "val_ood_cat", "val_ood_both"]
    md = summary.markdown_table(pd.DataFrame({"a": ["x"], "b": [float("nan")], "c": [12345.6]}))
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | – | 12,346 |"]


def test_report_without_runs_or_predictions(tmp_path, monkeypatch):
    """Tables and bars only; the default store is not created when absent."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "m.parquet"
    write_table(_long("gns", "deadbeef"), path)
    report.build_report([path], tmp_path / "out")
    assert (tmp_path / "out" / "plots" / "force_mae_by_split.png").is_file()
    assert not (tmp_path / "out" / "plots" / "learning_curves.png").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_metrics_table_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"model": ["x"], "value": [1.0]}).to_parquet(path)
    with pytest.raises(ValueError, match="bad.parquet"):
        report.build_report([path], tmp_path / "out")


def test_learning_curves_take_the_training_metrics(tmp_path):
    """The training loop reports ``step`` and ``epoch`` among its metrics; the curves are
    drawn against the optimizer step and the seconds."""
    rows = []
    for model, rate in (("forcenet", 20.0), ("schnet", 4.0)):
        for step in (100, 200, 300):
            metrics = {
                "step": step,
                "epoch": step / 100,
                "elapsed_s": step / rate,
                "train_loss": 1.0 / step,
                "forces_mae": 0.1 - step / 1e4,
                "zero_forces_mae": 0.12,
                "forces_mae_adsorbate": 0.2 - step / 1e4,
                "zero_forces_mae_adsorbate": 0.25,
            }
            rows += [
                {"model": model, "step": step, "metric": k, "value": float(v)}
                for k, v in metrics.items()
            ]
    path = tmp_path / "curves.png"
    assert plots.plot_learning_curves(pd.DataFrame(rows), path)
    assert path.stat().st_size > 5000
    one_point = pd.DataFrame([r for r in rows if r["step"] == 100])
    assert not plots.plot_learning_curves(one_point, tmp_path / "none.png")


def test_every_model_keeps_one_colour_of_its_own(monkeypatch):
    """The models of the pipeline take the colour cycle in their order; any other name
    (the oracle, a benchmark's variant) gets a colour no model has, the same each time."""
    from pipeline.params import MODEL_NAMES

    colours = [plots.model_colour(m) for m in MODEL_NAMES]
    assert colours == [f"C{k}" for k in range(len(MODEL_NAMES))]
    assert plots.model_colour("oracle") not in colours
    assert plots.model_colour("oracle") == plots.model_colour("oracle")
    monkeypatch.setattr(plots, "MODEL_NAMES", ("painn", *MODEL_NAMES))  # a model added first
    assert plots.model_colour("painn") == "C0" and plots.model_colour(MODEL_NAMES[0]) == "C1"


def _hybrid_relax(path) -> None:
    """gns's relaxation aggregates of a hybrid run: two splits and ``overall``."""
    rows = []
    for split, saved in (("val_id", 40.0), ("val_ood_ads", 50.5), ("overall", 45.3)):
        metrics = {
            "relax_systems": 3.0 if split != "overall" else 6.0,
            "adwt": 0.25,
            "fbt_oracle": 0.0,
            "ml_steps_limit": 60.0,
            "hybrid_steps_saved_pct": saved,
            "hybrid_steps_saved_pct_median": saved,
            "hybrid_steps_saved_total_pct": saved - 1.0,
            "hybrid_same_minimum": 2 / 3,
            "hybrid_adwt": 0.9,
            "hybrid_oracle_mean_steps": 12.5,
            "oracle_only_mean_steps": 23.0,
            "oracle_steps_limit": 400.0,
        }
        rows += [("gns", split, m, v, "") for m, v in metrics.items()]
    write_table(pd.DataFrame(rows, columns=TABLE_COLUMNS), path)


def _physics(tmp_path):
    """The physics stages' long tables (gns and the oracle) and MD series."""
    md = {
        "runs": 2.0,
        "steps": 250.0,
        "timestep_fs": 0.5,
        "temperature_K": 450.0,
        "drift_abs_mean": 0.125,
        "fluctuation_mean": 0.0025,
        "model_drift_abs_mean": float("nan"),
        "stable_fraction": 0.5,
        "first_event_ps": 0.105,
        "events_close_contact": 0.0,
        "events_desorbed": 1.0,
    }
    conservation = {"structures": 2.0, "lambda_mean": 0.35, "lambda_median": 0.34}
    conservation["loop_work_normalised_mean"] = 0.05
    reference = {**md, "drift_abs_mean": 2e-5, "fluctuation_mean": 6e-6}
    reference |= {"model_drift_abs_mean": 2e-5, "stable_fraction": 1.0}
    reference |= {"first_event_ps": float("inf"), "events_desorbed": 0.0}
    tables, series = [], []
    for model, parts in (
        ("gns", {"conservation": conservation, "md": md}),
        ("oracle", {"md": reference}),
    ):
        rows = [(model, s, m, v, "") for s, ms in parts.items() for m, v in ms.items()]
        tables.append(tmp_path / "physics" / f"{model}.parquet")
        write_table(pd.DataFrame(rows, columns=TABLE_COLUMNS), tables[-1])
        t = np.linspace(0.0, 0.125, 6)
        frame = pd.DataFrame(
            {
                "model": model,
                "name": "val_id:1",
                "n_free": 5,
                "step": np.arange(6) * 50,
                "time_ps": t,
                "oracle_potential_eV": -1.0 + t,
                "oracle_total_eV": 0.1 * t,
                "model_total_eV": float("nan"),
                "kinetic_eV": 0.3,
                "temperature_K": 450.0,
            }
        )
        series.append(tmp_path / "runs" / model / "md_series.parquet")
        write_table(frame, series[-1])
    return tables, series


def test_hybrid_and_physics_tables(inputs, tmp_path):
    """The hybrid table (overall included, percentages to one decimal, the step limits),
    force tables without the relax-only ``overall`` split, and the physics table with the
    oracle's reference row and the MD energy plot."""
    relax = tmp_path / "relax.parquet"
    _hybrid_relax(relax)
    physics, series = _physics(tmp_path)
    out = tmp_path / "reports"
    md = report.build_report([*inputs["metrics"], relax], out, physics=physics, md_series=series)
    matrix = next(line for line in md.splitlines() if line.startswith("| model | val_id"))
    assert matrix == "| model | val_id | val_ood_ads | val_ood_cat | val_ood_both |"
    assert "ran at most 60 steps (`relax.steps`" in md
    assert "| gns | overall | 6 | 0.2500 | 0.0000 | 60 |" in md
    assert "## Hybrid relaxations" in md and "Step limits: ML 60, oracle 400." in md
    assert "| gns | overall | 45.3 | 45.3 | 44.3 | 0.6667 | 0.9000 | 12.5 | 23.0 | 60 | 400 |" in md
    assert "2 structures × 250 steps of 0.5 fs (0.125 ps) from 450 K" in md
    gns = "| gns | 0.3500 | 0.3400 | 0.0500 | 0.1250 | 0.0025 | – | 0.5000 |"
    assert f"{gns} 0.105 ps (desorbed ×1) |" in md
    assert "| oracle | – | – | – | 2.0e-05 | 6.0e-06 | 2.0e-05 | 1.0000 | none |" in md
    assert md.count("plots/md_energy.png") == 1
    assert (out / "plots" / "md_energy.png").stat().st_size > 5000
    table = pd.read_parquet(out / "results.parquet")
    assert "overall" in set(table.split)  # the relaxation rows keep it


def _accuracy_point(model: str, budget: float, mae: float, ads: float) -> dict:
    return {
        "model": model,
        "budget": budget,
        "steps": int(100 * budget),
        "compute_seconds": 150.0 * budget,
        "forces_mae": mae,
        "forces_mae_adsorbate": ads,
    }


def test_accuracy_section_shows_where_the_curves_cross(inputs, tmp_path):
    """The best model per budget is read off the points: here ForceNet leads at 1x and
    SchNet at 4x overall, while on the adsorbate ForceNet leads at both."""
    results = {
        "budgets": {
            "forcenet@1x": _accuracy_point("forcenet", 1.0, 0.05, 0.10),
            "schnet@1x": _accuracy_point("schnet", 1.0, 0.06, 0.15),
            "forcenet@4x": _accuracy_point("forcenet", 4.0, 0.03, 0.05),
            "schnet@4x": _accuracy_point("schnet", 4.0, 0.02, 0.06),
            "schnet@16x": _accuracy_point("schnet", 16.0, 0.01, 0.03),
        },
        "widths": {
            "h128": {
                "model": "forcenet",
                "width": 128,
                "steps": 2031,
                "forces_mae": 0.06,
                "forces_mae_adsorbate": 0.16,
            },
            "h64": {
                "model": "forcenet",
                "width": 64,
                "steps": 3720,
                "forces_mae": 0.05,
                "forces_mae_adsorbate": 0.12,
            },
        },
        "zero_baseline": {"zero_forces_mae": 0.114, "zero_forces_mae_adsorbate": 0.214},
    }
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps(results))
    figure = tmp_path / "accuracy_vs_compute.png"
    figure.write_bytes(b"\x89PNG fake")
    out = tmp_path / "reports"
    md = report.build_report(inputs["metrics"], out, accuracy=path, accuracy_plot=figure)
    section = md[md.index("## Accuracy against training compute") :]
    lines = section.splitlines()
    assert "| budget | compute [s] | forcenet | schnet | best overall | best adsorbate |" in lines
    assert "| 1x | 150 | 0.0500 / 0.1000 | 0.0600 / 0.1500 | forcenet | forcenet |" in lines
    assert "| 4x | 600 | 0.0300 / 0.0500 | 0.0200 / 0.0600 | schnet | forcenet |" in lines
    assert "| 16x | 2,400 | – | 0.0100 / 0.0300 | schnet | schnet |" in lines
    widths = [line for line in lines if line.startswith("| h")]
    assert widths == ["| h64 | 3,720 | 0.0500 | 0.1200 |", "| h128 | 2,031 | 0.0600 | 0.1600 |"]
    assert "0.1140 / 0.2140 eV/Å" in section
    assert f"]({report.ACCURACY_PLOT})" in section
    assert (out / report.ACCURACY_PLOT).read_bytes() == figure.read_bytes()
    assert md.count(report.ACCURACY_PLOT) == 1  # not listed again under Plots


def test_accuracy_json_without_a_field_names_the_point(inputs, tmp_path):
    path = tmp_path / "accuracy.json"
    point = _accuracy_point("gns", 4.0, 0.05, 0.1)
    del point["forces_mae_adsorbate"]
    path.write_text(json.dumps({"budgets": {"gns@4x": point}}))
    with pytest.raises(
        ValueError, match=r"accuracy.json: point budgets/gns@4x lacks forces_mae_ad"
    ):
        report.build_report(inputs["metrics"], tmp_path / "out", accuracy=path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="accuracy.json: not a readable"):
        report.build_report(inputs["metrics"], tmp_path / "out", accuracy=path)


def _option_entry(key: str, model: str, options: dict, dev: float, **extra) -> dict:
    return {
        "key": key,
        "model": model,
        "options": options,
        "steps": 3720,
        "seconds": 150.0,
        "dev_forces_mae": dev,
        "dev_forces_mae_adsorbate": 2 * dev,
        "val_id_forces_mae": dev + 0.001,
        "val_id_forces_mae_adsorbate": 2 * dev + 0.001,
        "rotation_covariance_error": 0.02,
        "lambda": 0.1,
        **extra,
    }


def test_options_section_tabulates_every_set_and_names_the_dev_choice(inputs, tmp_path):
    """One row per option set; the choice is the ForceNet set of lowest dev MAE, whatever
    its val_id figure (SchNet, the reference, is never the choice)."""
    entries = [
        _option_entry("schnet", "schnet", {}, 0.030),
        _option_entry("forcenet", "forcenet", {}, 0.050),
        _option_entry("fa", "forcenet", {"frame_averaging": "stochastic"}, 0.045,
                      rotation_covariance_error=1e-7, val_id_forces_mae=0.09),
    ]  # fmt: skip
    path = tmp_path / "forcenet_options.json"
    path.write_text(json.dumps({"machine": {"cpu": "Test CPU"}, "threads": 1, "entries": entries}))
    md = report.build_report(inputs["metrics"], tmp_path / "out", options=path)
    section = md[md.index("## Training options at the default compute") :]
    assert "Test CPU with 1 thread(s)" in section
    assert "Lowest dev MAE among the ForceNet sets: *frame_averaging=stochastic*." in section
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| forcenet") or line.startswith("| schnet")
    ]
    assert len(rows) == 3 and "(recipe of params.yaml)" in rows[1]
    entries[0].pop("lambda")
    path.write_text(json.dumps({"entries": entries}))
    with pytest.raises(ValueError, match=r"training options entry 0 \(schnet\): no \['lambda'\]"):
        report.build_report(inputs["metrics"], tmp_path / "out2", options=path)
