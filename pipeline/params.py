"""``params.yaml``, read once per stage into frozen dataclasses.

Every section and key is checked: an unknown key (a typo such as ``graph.cuttoff`` or an
unknown top-level section) is refused with a "did you mean" suggestion, a missing key or a
value of the wrong type names its dotted key. The model sections are the constructor
arguments of :mod:`forcenet.models`, checked against the constructor by the train stage.
This module imports no model or training code, so that the data stages do not depend
on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from forcenet.config import ConfigError, load_yaml, parse

#: The models the pipeline trains (keys of ``model`` and ``train``; ``vars`` in dvc.yaml).
MODEL_NAMES = ("forcenet", "schnet", "dimenetpp", "gns")
#: Keys of ``train`` shared by every model (the same caps for all).
SHARED_TRAIN_KEYS = ("time_budget_s", "max_epochs", "seed", "num_workers")
PARAMS_FILE = Path("params.yaml")


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class EmtConfig:
    """``data.emt``: the embedded OC20-like dataset (:func:`forcenet.data.generate.generate_emt`)."""

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


@dataclass(frozen=True)
class Oc20Config:
    """``data.oc20``: the official S2EF archives."""

    base_url: str
    train: str  # 200k | 2M | 20M | all
    val: tuple[str, ...]


@dataclass(frozen=True)
class FilesConfig:
    """``data.files``: your own ASE-readable files, by split name."""

    splits: dict[str, tuple[str, ...]]
    shard_size: int
    reference_energy: float  # eV subtracted from every frame's energy


@dataclass(frozen=True)
class DataConfig:
    """``data``: where the raw frames come from."""

    source: Literal["emt", "oc20", "files"]
    emt: EmtConfig
    oc20: Oc20Config
    files: FilesConfig


# ------------------------------------------------------------------- the other sections


@dataclass(frozen=True)
class PreprocessConfig:
    """``preprocess``: worker processes of the preprocess and neighbors stages."""

    workers: int


@dataclass(frozen=True)
class GraphConfig:
    """``graph``: neighbor lists (cutoff in Å, nearest ``max_neighbors`` per atom)."""

    cutoff: float
    max_neighbors: int

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise ConfigError(f"graph.cutoff: must be > 0 Å, got {self.cutoff}")
        if self.max_neighbors < 1:
            raise ConfigError(f"graph.max_neighbors: must be >= 1, got {self.max_neighbors}")


@dataclass(frozen=True)
class ModelConfig:
    """``model``: constructor arguments per model. ``hidden`` is ForceNet's width, its
    ``hidden_channels`` (``dvc exp run -S model.hidden=512``), kept out of
    ``model.forcenet`` so that one key, shown by ``dvc exp show``, says the width."""

    hidden: int
    forcenet: dict[str, Any]
    schnet: dict[str, Any]
    dimenetpp: dict[str, Any]
    gns: dict[str, Any]


@dataclass(frozen=True)
class TrainSection:
    """``train``: the shared caps plus one :class:`forcenet.train.TrainConfig` mapping per
    model."""

    time_budget_s: float
    max_epochs: int
    seed: int
    num_workers: int
    forcenet: dict[str, Any]
    schnet: dict[str, Any]
    dimenetpp: dict[str, Any]
    gns: dict[str, Any]


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate``: structures per inference batch."""

    batch_size: int


@dataclass(frozen=True)
class RelaxConfig:
    """``relax``: ML relaxations of the embedded validation systems (oracle-checked)."""

    optimizer: Literal["lbfgs", "fire"]
    fmax: float  # eV/Å, convergence on free atoms
    steps: int  # maximum optimizer steps
    batch_size: int  # structures relaxed together per forward pass
    splits: tuple[str, ...]


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    data: DataConfig
    preprocess: PreprocessConfig
    graph: GraphConfig
    model: ModelConfig
    train: TrainSection
    evaluate: EvaluateConfig
    relax: RelaxConfig


def model_name(name: str) -> str:
    """``name``, refused unless it is one of :data:`MODEL_NAMES`."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose from {list(MODEL_NAMES)}")
    return name


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and check ``params.yaml``: every section and key. The model sections and
    ``train.<model>`` are checked by the train stage (:func:`pipeline.train.train_config`),
    which alone imports the models."""
    return params_from_mapping(load_yaml(path), where=str(path))


def params_from_mapping(data: Mapping[str, Any], *, where: str = "params") -> Params:
    """:class:`Params` from an already loaded mapping (e.g. with overrides applied)."""
    try:
        return parse(Params, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
