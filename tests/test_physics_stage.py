"""The physics stages: structures taken in turn from each split, the oracle's reference
and a model's conservation and NVE MD from the same starts, as long tables, DVC metrics
and MLflow metrics."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ase.io import write
from test_calculator import write_tiny_checkpoint
from test_physics_md import cu_slab

from forcenet.physics import md
from pipeline import physics, physics_inputs, physics_oracle

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ["val_id", "val_ood_ads"]


@pytest.fixture
def is2rs(tmp_path: Path) -> Path:
    """Two splits of IS2RS initial structures as the data stage writes them."""
    folder = tmp_path / "is2rs"
    folder.mkdir()
    for split, adsorbates, first in (("val_id", ["O", "CO"], 1), ("val_ood_ads", ["N"], 10)):
        images = []
        for k, ads in enumerate(adsorbates):
            atoms = cu_slab(ads)
            atoms.info["sid"] = first + k
            images.append(atoms)
        write(folder / f"{split}_initial.extxyz", images, format="extxyz")
    return folder


def _params(tmp_path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = copy.deepcopy(params)
    params["physics"] = {
        "splits": SPLITS,
        "conservation": {"structures": 1},
        "md": {
            "structures": 2,
            "temperature_K": 450.0,
            "timestep_fs": 0.5,
            "steps": 20,
            "interval": 5,
            "seed": 0,
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_structures_are_taken_in_turn_from_each_split(is2rs):
    atoms, names = physics_inputs.physics_structures(is2rs, SPLITS, 3)
    assert names == ["val_id:1", "val_ood_ads:10", "val_id:2"]
    assert [a.get_chemical_formula() for a in atoms][1] == "Cu8N"
    _, names = physics_inputs.physics_structures(is2rs, SPLITS, 10)  # fewer exist
    assert len(names) == 3
    with pytest.raises(FileNotFoundError, match="val_ood_cat_initial.extxyz"):
        physics_inputs.physics_structures(is2rs, [*SPLITS, "val_ood_cat"], 2)


def test_physics_stages_write_tables_metrics_and_mlflow(is2rs, tmp_path, monkeypatch):
    """The oracle reference and a model's run: the same seeded starts, lambda on the first
    structure, MD on the first two, the aggregates in the long table, DVC JSON and the
    model's MLflow run as ``conservation/...`` and ``md/...``; the wall times in the
    timing files alone."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = _params(tmp_path)
    ckpt = tmp_path / "models" / "gns" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    write_tiny_checkpoint(ckpt, "gns", force_scale=0.05)
    reports, data = tmp_path / "reports", tmp_path / "data"

    oracle_args = [str(is2rs), "--out", str(data / "oracle"), "--params", str(params)]
    oracle_args += ["--table", str(reports / "oracle.parquet")]
    oracle_args += ["--timing", str(reports / "timing" / "physics_oracle.json")]
    physics_oracle.main(oracle_args)
    args = [str(ckpt), str(is2rs), "--out", str(data / "gns"), "--params", str(params)]
    args += ["--table", str(reports / "gns.parquet")]
    args += ["--metrics-json", str(reports / "physics_gns.json")]
    args += ["--timing", str(reports / "timing" / "physics_gns.json")]
    physics.main(args)
    for name in ("gns", "oracle"):
        timing = json.loads((reports / "timing" / f"physics_{name}.json").read_text())
        assert timing["seconds"] >= timing["md_wall_s"] > 0
        summary = pd.read_parquet(data / name / md.MD_SUMMARY)
        assert "wall_s" not in summary.columns and len(summary) == 2
        assert "wall_s" not in set(pd.read_parquet(reports / f"{name}.parquet").metric)

    long = pd.read_parquet(reports / "gns.parquet")
    assert set(long.split) == {"conservation", "md"}
    value = long.set_index(["split", "metric"])["value"]
    assert value["conservation", "structures"] == 1 and value["md", "runs"] == 2
    assert 0 < value["conservation", "lambda_mean"] < 1  # a direct-force model
    assert math.isnan(value["md", "model_drift_abs_mean"])  # force-only: no energy
    assert value["md", "steps"] == 20 and value["md", "timestep_fs"] == 0.5
    kinds = [m for m in long.metric if m.startswith("events_")]
    assert sum(value["md", k] for k in kinds) == 2 * (1 - value["md", "stable_fraction"])
    oracle = pd.read_parquet(reports / "oracle.parquet").set_index("metric")["value"]
    assert oracle["stable_fraction"] == 1 and oracle["first_event_ps"] == math.inf
    assert abs(oracle["drift_mean"]) < 1e-3

    table = pd.read_parquet(data / "gns" / physics.CONSERVATION_TABLE)
    assert table.structure.tolist() == ["val_id:1"] and table.model.tolist() == ["gns"]
    series = {name: pd.read_parquet(data / name / md.MD_SERIES) for name in ("gns", "oracle")}
    starts = {k: s[s.step == 0].set_index("name").kinetic_eV for k, s in series.items()}
    assert starts["gns"].index.tolist() == ["val_id:1", "val_ood_ads:10"]
    np.testing.assert_allclose(starts["gns"].to_numpy(), starts["oracle"].to_numpy())
    assert (data / "gns" / md.MD_PLOT).stat().st_size > 0

    dvc = json.loads((reports / "physics_gns.json").read_text())
    assert set(dvc) == {"conservation", "md"}
    assert set(dvc["md"]) == {"drift_abs_mean", "fluctuation_mean", "stable_fraction"}
    assert dvc["conservation"]["lambda_mean"] == pytest.approx(value["conservation", "lambda_mean"])
    (run,) = mlflow.MlflowClient(uri).search_runs(["1"])
    assert run.data.metrics["conservation/lambda_mean"] == pytest.approx(
        dvc["conservation"]["lambda_mean"]
    )
    assert "md/stable_fraction" in run.data.metrics
