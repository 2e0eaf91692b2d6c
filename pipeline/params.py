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

from forcenet.config import ConfigError, load_yaml, parse, unknown_keys_message

#: The pipeline, whose ``vars: models`` names the models it trains, in order: the one list
#: of them (each has its stages ``train@<name>``, ``evaluate@<name>``, ...).
PIPELINE_FILE = Path(__file__).resolve().parents[1] / "dvc.yaml"
#: Keys of ``model`` that are not a model: ForceNet's width.
SHARED_MODEL_KEYS = ("hidden",)
#: Keys of ``train`` shared by every model (the same caps for all).
SHARED_TRAIN_KEYS = ("time_budget_s", "max_epochs", "seed", "num_workers")
PARAMS_FILE = Path("params.yaml")


def pipeline_models(path: Path = PIPELINE_FILE) -> tuple[str, ...]:
    """The names under ``vars: models`` of the pipeline file ``path``, in order."""
    for entry in load_yaml(path).get("vars", []):
        if isinstance(entry, Mapping) and isinstance(entry.get("models"), Mapping):
            return tuple(str(name) for name in entry["models"])
    raise ConfigError(f"{path}: no `vars: models` naming the models of the pipeline")


#: The models the pipeline trains: keys of ``model`` and ``train`` in params.yaml.
MODEL_NAMES = pipeline_models()


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class EmtConfig:
    """``data.emt``: the embedded OC20-like dataset (:func:`forcenet.emt.generate.generate_emt`)."""

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
    """``graph``: neighbor lists (cutoff in Å, nearest ``max_neighbors`` per atom);
    ``on_the_fly``: train and evaluate build each batch's graph on the model's device with
    these settings instead of reading the graph store (the same edges)."""

    cutoff: float
    max_neighbors: int
    on_the_fly: bool

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise ConfigError(f"graph.cutoff: must be > 0 Å, got {self.cutoff}")
        if self.max_neighbors < 1:
            raise ConfigError(f"graph.max_neighbors: must be >= 1, got {self.max_neighbors}")


@dataclass(frozen=True)
class ModelConfig:
    """``model``: constructor arguments per model, ``model.<name>`` for every name of
    :data:`MODEL_NAMES`. ``hidden`` is ForceNet's width, its ``hidden_channels`` (``dvc exp
    run -S model.hidden=512``), kept out of ``model.forcenet`` so that one key, shown by
    ``dvc exp show``, says the width."""

    hidden: int
    models: dict[str, dict[str, Any]]  # model.<name>, by name

    def of(self, name: str) -> dict[str, Any]:
        """``model.<name>``, a copy; an unknown name is refused."""
        return dict(self.models[model_name(name)])


@dataclass(frozen=True)
class TrainSection:
    """``train``: the shared caps plus one :class:`forcenet.train.TrainConfig` mapping per
    model, ``train.<name>``."""

    time_budget_s: float
    max_epochs: int
    seed: int
    num_workers: int
    models: dict[str, dict[str, Any]]  # train.<name>, by name

    def of(self, name: str) -> dict[str, Any]:
        """``train.<name>``, a copy; an unknown name is refused."""
        return dict(self.models[model_name(name)])


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
    hybrid: bool  # also finish each ML result with the oracle, against an oracle-only run
    oracle_fmax: float  # eV/Å, the oracle's target in hybrid and oracle-only relaxations
    oracle_steps: int  # the oracle's step limit there

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"relax.steps: must be >= 0, got {self.steps}")
        if not self.oracle_fmax > 0:
            raise ConfigError(f"relax.oracle_fmax: must be > 0 eV/Å, got {self.oracle_fmax}")
        if self.oracle_steps < 0:
            raise ConfigError(f"relax.oracle_steps: must be >= 0, got {self.oracle_steps}")


@dataclass(frozen=True)
class ConservationConfig:
    """``physics.conservation``: the Jacobian asymmetry and loop work of a model's forces
    (:func:`forcenet.physics.conservation.conservation_table`, float64)."""

    structures: int  # the first N physics structures

    def __post_init__(self) -> None:
        if self.structures < 1:
            raise ConfigError(
                f"physics.conservation.structures: must be >= 1, got {self.structures}"
            )


@dataclass(frozen=True)
class MDConfig:
    """``physics.md``: NVE molecular dynamics driven by a model, judged by the oracle
    (:class:`forcenet.physics.md.NVESettings`)."""

    structures: int  # the first N physics structures
    temperature_K: float  # starting temperature of the free atoms
    timestep_fs: float
    steps: int  # Velocity Verlet steps per structure
    interval: int  # steps between samples of the oracle energy
    seed: int  # velocity seed (the same start for every model and the oracle)

    def __post_init__(self) -> None:
        for key in ("structures", "steps", "interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"physics.md.{key}: must be >= 1, got {getattr(self, key)}")
        if not self.timestep_fs > 0:
            raise ConfigError(f"physics.md.timestep_fs: must be > 0, got {self.timestep_fs}")
        if not self.temperature_K >= 0:
            raise ConfigError(f"physics.md.temperature_K: must be >= 0, got {self.temperature_K}")


@dataclass(frozen=True)
class PhysicsConfig:
    """``physics``: the physics checks of each model on IS2RS initial structures of
    ``splits``, taken in turn from each split (the first of every split, then the
    second, ...)."""

    splits: tuple[str, ...]
    conservation: ConservationConfig
    md: MDConfig

    def __post_init__(self) -> None:
        if not self.splits:
            raise ConfigError("physics.splits: name at least one split")


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
    physics: PhysicsConfig


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
        if isinstance(data, Mapping):
            data = {**data, **_by_model(data, "model", SHARED_MODEL_KEYS)}
            data = {**data, **_by_model(data, "train", SHARED_TRAIN_KEYS)}
        return parse(Params, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _by_model(data: Mapping[str, Any], section: str, shared: tuple[str, ...]) -> dict[str, Any]:
    """``{section: ...}`` with the per-model mappings of ``data[section]`` gathered under
    ``models``, each model of :data:`MODEL_NAMES` required and no other; nothing when the
    section is absent or not a mapping (:func:`forcenet.config.parse` names that)."""
    part = data.get(section)
    if not isinstance(part, Mapping):
        return {}
    unknown = sorted(set(part) - set(shared) - set(MODEL_NAMES))
    if unknown:
        raise ConfigError(unknown_keys_message(section, unknown, [*shared, *MODEL_NAMES]))
    for name in MODEL_NAMES:
        if name not in part:
            raise ConfigError(f"{section}.{name}: missing")
        if not isinstance(part[name], Mapping):
            raise ConfigError(f"{section}.{name}: expected a mapping")
    models = {name: dict(part[name]) for name in MODEL_NAMES}
    return {section: {**{k: part[k] for k in shared if k in part}, "models": models}}
