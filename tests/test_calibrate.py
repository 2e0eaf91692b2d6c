"""benchmarks/calibrate_steps.py writes step budgets into params.yaml, comments kept."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from forcenet.config import load_yaml
from pipeline.params import params_from_mapping
from pipeline.train import train_config

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "calibrate_steps", ROOT / "benchmarks" / "calibrate_steps.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_params_sets_each_models_max_steps_and_keeps_the_rest(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    before = path.read_text()
    steps = {"forcenet": 1234, "schnet": 56, "dimenetpp": 7, "gns": 890}
    _module().write_params(path, steps)
    after = path.read_text()
    params = params_from_mapping(load_yaml(path))
    for name, n in steps.items():
        assert train_config(params, name).max_steps == n
    # only the max_steps lines changed: same comments, same other values
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == len(steps) and all("max_steps:" in b for _, b in changed)
    assert [line for line in after.splitlines() if line.lstrip().startswith("#")] == [
        line for line in before.splitlines() if line.lstrip().startswith("#")
    ]


def test_write_params_refuses_a_model_without_a_step_budget(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    with pytest.raises(SystemExit, match="nomodel"):
        _module().write_params(path, {"nomodel": 10})
    assert path.read_text() == (ROOT / "params.yaml").read_text()
