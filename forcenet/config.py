"""``params.yaml`` loaded into frozen dataclasses that reject unknown or missing keys.

``params.yaml`` is the single source of every setting: DVC stages list the keys they
depend on, and the CLI commands read the same file through :func:`load_params`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """params.yaml does not match the expected schema."""


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown or missing keys raise."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected {sorted(fields)}")
    values = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(f"{key}: missing")
            continue
        values[name] = _convert(hints[name], data[name], key)
    return cls(**values)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        vt = args[1] if args else Any
        return {k: _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        et = args[0] if args else Any
        return tuple(_convert(et, v, where) for v in value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def load_yaml(path: Path) -> dict[str, Any]:
    """The raw params mapping (plain dict) of a YAML file."""
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def section(params: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key (``"model.forcenet"``), with a clear error if absent."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"params: missing key {dotted!r}")
        node = node[part]
    return node


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class EmtConfig:
    """``data.emt``: the embedded OC20-like dataset (see :func:`forcenet.data.generate.generate_emt`)."""

    seed: int
    n_systems: dict[str, int]  # systems per split (train, val_id, val_ood_ads, ...)
    frames_per_system: int  # relaxation frames sampled per system
    md_frames_per_system: int  # MD frames sampled per system
    relax_steps: int  # BFGS steps of the sampled relaxation
    md_temperature_K: float
    max_force: float  # eV/Å; frames above are rejected
    workers: int  # processes (the output does not depend on it)
    shard_size: int  # frames per raw shard
    is2rs_systems: int  # validation systems per split kept for relaxation benchmarks
    is2rs_fmax: float  # eV/Å; the oracle's own relaxation target


@dataclasses.dataclass(frozen=True)
class Oc20Config:
    """``data.oc20``: the official S2EF archives."""

    base_url: str
    train: str  # 200k | 2M | 20M | all
    val: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FilesConfig:
    """``data.files``: your own ASE-readable files, by split name."""

    splits: dict[str, tuple[str, ...]]
    shard_size: int
    reference_energy: float  # eV subtracted from every frame's energy


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``data``: where the raw frames come from."""

    source: Literal["emt", "oc20", "files"]
    emt: EmtConfig
    oc20: Oc20Config
    files: FilesConfig


def load_data_config(path: Path) -> DataConfig:
    return parse(DataConfig, section(load_yaml(path), "data"), "data")


# ------------------------------------------------------------------- models, training

#: Names of the models the pipeline trains (keys of params.yaml ``model`` and ``train``).
MODEL_NAMES = ("forcenet", "schnet", "dimenetpp", "gns")
#: Keys of params.yaml ``train`` shared by every model (the same budget for all).
SHARED_TRAIN_KEYS = ("time_budget_s", "max_epochs", "seed", "num_workers")


def model_kwargs(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Constructor kwargs of model ``name``: ``model.<name>`` plus the graph cutoff.

    ``model.hidden`` (default null) is the short alias of ForceNet's ``hidden_channels``:
    when set, ``dvc exp run -S model.hidden=512`` widens ForceNet without spelling the
    full key.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose from {list(MODEL_NAMES)}")
    kwargs = dict(section(params, f"model.{name}"))
    alias = section(params, "model").get("hidden")
    if name == "forcenet" and alias is not None:
        kwargs["hidden_channels"] = int(alias)
    kwargs["cutoff"] = float(section(params, "graph.cutoff"))
    return kwargs


def train_config(params: Mapping[str, Any], name: str):
    """:class:`forcenet.train.TrainConfig` of model ``name``: ``train.<name>`` plus the
    shared keys (``train.time_budget_s`` etc.), unknown keys rejected."""
    from forcenet.train import TrainConfig

    train = section(params, "train")
    merged = {k: train[k] for k in SHARED_TRAIN_KEYS if k in train}
    own = section(params, f"train.{name}")
    clash = sorted(set(own) & set(SHARED_TRAIN_KEYS))
    if clash:
        raise ConfigError(f"train.{name}: {clash} are shared keys; set them under train")
    merged.update(own)
    return parse(TrainConfig, merged, f"train.{name}")


def graph_settings(params: Mapping[str, Any]) -> dict[str, float | int]:
    g = section(params, "graph")
    return {"cutoff": float(g["cutoff"]), "max_neighbors": int(g["max_neighbors"])}


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """``relax``: ML relaxations of the embedded validation systems (oracle-checked)."""

    optimizer: Literal["lbfgs", "fire"]
    fmax: float  # eV/Å, convergence on free atoms
    steps: int  # maximum optimizer steps
    batch_size: int  # structures relaxed together per forward pass
    splits: tuple[str, ...]


def load_relax_config(path: Path) -> RelaxConfig:
    return parse(RelaxConfig, section(load_yaml(path), "relax"), "relax")
