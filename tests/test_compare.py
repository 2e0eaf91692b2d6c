"""`python -m pipeline.compare`: model × experiment × split from the MLflow store."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline import compare, tracking


def _run(store, model, exp_name, hidden, mae, out_dir):
    import os

    os.environ["DVC_EXP_NAME"] = exp_name
    try:
        params = {
            "model": {model: {"hidden_channels": hidden, "num_interactions": 3}},
            "train": {model: {"max_steps": 100}},
            "data": {"source": "emt"},
        }
        run = tracking.start_training_run(
            model=model, params=params, out_dir=out_dir, tracking_uri=store
        )
    finally:
        del os.environ["DVC_EXP_NAME"]
    rows = []
    for split, shift in (("val_id", 0.0), ("val_ood_ads", 0.01)):
        rows += [
            (split, "forces_mae", mae + shift),
            (split, "forces_mae_adsorbate", 2 * mae),
            (split, "forces_cos", 0.5),
            (split, "inference_graphs_per_s", 99.0),
        ]
    rows.append(("training", "train_steps", 100.0))
    tracking.log_split_metrics(run, pd.DataFrame(rows, columns=["split", "metric", "value"]))
    tracking.finish_run(run)
    return run.run_id


def test_compare_lists_each_experiment_with_the_params_that_differ(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _run(store, "forcenet", "baseline", 64, 0.05, tmp_path / "a")
    _run(store, "forcenet", "wide", 512, 0.04, tmp_path / "b")
    _run(store, "schnet", "baseline", 128, 0.06, tmp_path / "c")
    table = compare.comparison(compare.load_runs(store), splits=["val_id"])
    assert table[["model", "experiment", "changed"]].values.tolist() == [
        ["forcenet", "baseline", "hidden_channels=64"],
        ["forcenet", "wide", "hidden_channels=512"],
        ["schnet", "baseline", "(baseline params)"],
    ]
    assert table.forces_mae.tolist() == pytest.approx([0.05, 0.04, 0.06])
    assert table.forces_mae_adsorbate.tolist() == pytest.approx([0.10, 0.08, 0.12])
    assert set(table.split) == {"val_id"} and table.steps.tolist() == [100.0] * 3

    compare.main(
        ["--tracking-uri", store, "--out", str(tmp_path / "cmp"), "--split", "val_ood_ads"]
    )
    md = (tmp_path / "cmp.md").read_text()
    assert "| forcenet | wide | hidden_channels=512 | val_ood_ads | 0.0500 | 0.0800 |" in md
    assert len(pd.read_parquet(tmp_path / "cmp.parquet")) == 3
    assert len(pd.read_csv(tmp_path / "cmp.csv")) == 3


def test_compare_without_runs_says_what_to_do(tmp_path, capsys):
    compare.main(["--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert "make repro" in capsys.readouterr().out
