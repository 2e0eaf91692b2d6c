"""The training settings: every TrainConfig field has a checked range, refused before any
work with the params key named (NaN and inf included)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from forcenet.train import TrainConfig
from forcenet.train.config import load_run_config
from pipeline.params import params_from_mapping
from pipeline.train import train_config

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
NAN, INF = float("nan"), float("inf")


def _params(section: str, **values):
    params = copy.deepcopy(PARAMS)
    node = params["train"] if section == "train" else params["train"][section]
    node.update(values)
    return params_from_mapping(params)


def test_every_field_has_a_checked_range():
    from forcenet.train.config import FIELD_CHECKS

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(FIELD_CHECKS) == sorted(names)
    TrainConfig()  # the defaults pass


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("warmup_start", -3, r"-3.0 is out of range: need 0 <= warmup_start <= 1"),
        ("tag_weights", [-1, -1, -1], r"-1.0 \(entry 0\) is out of range: need tag_weights >= 0"),
        ("tag_weights", [0, 0, 0], r"not all 0"),
        ("tag_weights", [1.0, 1.0], r"need 3 weights"),
        ("lr", INF, r"inf is not a finite number: need lr > 0"),
        ("lr", NAN, r"nan is not a finite number"),
        ("lr", 0.0, r"need lr > 0"),
        ("loss_beta", NAN, r"nan is not a finite number"),
        ("weight_decay", -0.1, r"need weight_decay >= 0"),
        ("gamma", 2.0, r"need 0 < gamma <= 1"),
        ("min_lr_factor", NAN, r"nan is not a finite number"),
        ("milestones", [0.5, NAN], r"nan \(entry 1\)"),
        ("milestones", [0.8, 0.5], r"ascending"),
        ("clip_grad", -1.0, r"need clip_grad >= 0"),
        ("energy_coef", NAN, r"nan is not a finite number"),
        ("eval_batch_size", 0, r"need eval_batch_size >= 1"),
        ("dev_fraction", 1.0, r"need 0 <= dev_fraction < 1"),
        ("adsorbate_beta", -1.0, r"need adsorbate_beta > 0"),
    ],
)
def test_bad_values_are_refused_naming_the_params_key(key, value, message):
    with pytest.raises(ValueError, match=rf"^train\.forcenet\.{key}: .*{message}"):
        train_config(_params("forcenet", **{key: value}), "forcenet")


def test_shared_keys_are_named_where_they_are_set():
    with pytest.raises(ValueError, match=r"^train\.time_budget_s: nan is not a finite number"):
        train_config(_params("train", time_budget_s=NAN), "gns")
    with pytest.raises(ValueError, match=r"^train\.seed: -1 is out of range"):
        train_config(_params("train", seed=-1), "gns")


def test_run_config_names_the_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: .inf}\n")
    with pytest.raises(ValueError, match=rf"^{path}: train\.lr: inf is not a finite number"):
        load_run_config("gns", path)
    with pytest.raises(ValueError, match=r"element_energies: nan \(entry 'H'\)"):
        load_run_config("gns", None, ["train.element_energies={H: .nan}"])
