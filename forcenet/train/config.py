"""The training hyperparameters (:class:`TrainConfig`, params.yaml ``train.<model>``), the
loss they define for a model (:func:`make_loss`, in the model's normalised units), and the
run-config file of ``forcenet train --config`` (:func:`load_run_config`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from ase.data import atomic_numbers

from forcenet.config import (
    Check,
    ConfigError,
    FieldError,
    Flag,
    OneOf,
    Range,
    Text,
    check_fields,
    load_yaml,
    parse,
    unknown_keys_message,
)
from forcenet.frames import FrameMode
from forcenet.losses import ForceLossKind, LossAtoms, TrainLoss
from forcenet.scaling import ScaledModel
from forcenet.schedule import LrDecay, Schedule

#: How energies are referenced before normalisation (see :class:`TrainConfig`).
EnergyReference = Literal["mean", "per_element", "isolated"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (params.yaml ``train.<model>``); units in brackets.

    Optimiser AdamW(``lr``, ``weight_decay``). Schedule: linear warm-up over
    ``warmup_steps`` from ``warmup_start * lr``, then ``lr_decay`` (cosine to
    ``min_lr_factor * lr``, or x ``gamma`` at each of ``milestones``, fractions of the
    budget). Budget: ``max_steps`` optimizer steps (0 = none), capped by ``max_epochs``
    and by the opt-in wall-clock cap ``time_budget_s`` [s] (0 = none), whichever ends first;
    only a step or epoch budget is reproducible. ``eval_every``: dev evaluation (and
    ``last.pt``) every that many steps, besides each epoch end (0 = epoch ends only). Loss:
    ``force_loss`` on forces divided by the force scale, per-atom weights from
    ``loss_atoms`` (``tag_weights`` for tags 0/1/2, or free atoms only; ``loss_beta`` is the
    smooth_l1/berhu transition in normalised units; ``adsorbate_loss``, when set, is
    the loss of adsorbate atoms, tag 2, instead of ``force_loss``, and ``adsorbate_beta``
    its transition), plus
    ``energy_coef`` x L1 on normalised energies for models with an energy.
    ``clip_grad`` [normalised units] 0 = off. ``rotation_augment``: a random SO(3) rotation
    of every training structure (pos, cell, forces) at each draw. ``amp``: bf16 autocast,
    CUDA and direct-force models only. ``dev_fraction``: share of training systems held out
    (of frames when there are fewer than ``forcenet.train.data.MIN_DEV_SYSTEMS`` systems).
    ``energy_reference``: how energies are referenced before normalisation: ``"mean"``
    (one per-structure mean, for energies already referenced, e.g. adsorption energies),
    ``"per_element"`` (E ~ sum_Z n_Z e_Z fitted on the training split by least squares,
    then the residual's mean/std, for raw total energies of mixed compositions; the fit
    determines every e_Z only when the compositions span the elements, else a warning
    names its rank) or ``"isolated"`` (e_Z = the energy of the isolated atom Z, on the
    scale of the training energies; elements without one fall back to the least-squares
    fit of what is left, and are named in the start line). ``element_energies`` [eV by
    element symbol]: given e_Z (``per_element``: used instead of the fit, every training
    element needs one; ``isolated``: the isolated-atom energies). ``isolated_atoms``: an
    ASE-readable file (extxyz, ...) of single-atom frames with energies, the
    isolated-atom energies of ``isolated`` (instead of ``element_energies``).
    ``conservative_finetune_steps`` (ForceNet only; 0 = off): the last that many steps of
    the step budget (``max_steps``, or fewer when ``max_epochs`` binds first) train the
    ForceNet with forces = -dE/dpos of its energy head (``forces="gradient"``, the energy
    head switched on), after direct forces before; the checkpoints of that phase predict
    conservative forces. See :func:`forcenet.train.conservative.start_conservative_phase`.
    That phase has a schedule of its own when ``conservative_lr`` > 0: warm-up over
    ``conservative_warmup_steps`` from ``warmup_start * conservative_lr``, then a cosine
    over the phase to ``min_lr_factor * conservative_lr`` (0 = the run's schedule goes on).
    ``frame_averaging`` (direct-force models): ``"none"``, ``"stochastic"`` (one random
    principal-axis frame per structure and step in training, all 8 in evaluation) or
    ``"full"`` (all 8 always); see :mod:`forcenet.frames`. ``ema_decay`` (0 = off): an
    exponential moving average of the weights, updated after every step with this decay;
    the dev metrics, ``best.pt`` and ``last.pt``'s model are the averaged weights.
    """

    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    warmup_start: float = 0.1
    lr_decay: LrDecay = "cosine"
    milestones: tuple[float, ...] = (0.6, 0.85)
    gamma: float = 0.1
    min_lr_factor: float = 0.02
    batch_size: int = 16
    eval_batch_size: int = 32
    max_epochs: int = 100
    max_steps: int = 0
    eval_every: int = 0
    time_budget_s: float = 0.0
    force_loss: ForceLossKind = "l1"
    adsorbate_loss: ForceLossKind | None = None
    loss_beta: float = 1.0
    adsorbate_beta: float | None = None
    loss_atoms: LossAtoms = "tag_weighted"
    tag_weights: tuple[float, ...] = (0.05, 1.0, 1.0)
    force_coef: float = 1.0
    energy_coef: float = 0.0
    clip_grad: float = 10.0
    rotation_augment: bool = True
    amp: bool = True
    dev_fraction: float = 0.1
    num_workers: int = 0
    seed: int = 0
    energy_reference: EnergyReference = "per_element"
    element_energies: dict[str, float] = field(default_factory=dict)
    isolated_atoms: str | None = None
    conservative_finetune_steps: int = 0
    conservative_lr: float = 0.0
    conservative_warmup_steps: int = 0
    frame_averaging: FrameMode = "none"
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, FIELD_CHECKS)
        n = self.conservative_finetune_steps
        if n > 0 and not n <= self.max_steps:
            raise FieldError(
                "conservative_finetune_steps",
                f"{n} needs a step budget max_steps >= {n} (got max_steps={self.max_steps}): "
                "the conservative fine-tune is the last conservative_finetune_steps of max_steps",
            )
        if n > 0 and self.frame_averaging != "none":
            raise FieldError(
                "frame_averaging",
                "frame_averaging is for direct forces and conservative_finetune_steps trains "
                "-dE/dx: use one of them",
            )
        if len(self.tag_weights) != 3 or not sum(self.tag_weights) > 0:
            raise FieldError(
                "tag_weights",
                f"{list(self.tag_weights)}: need 3 weights (tags 0, 1, 2), >= 0, not all 0",
            )
        if list(self.milestones) != sorted(self.milestones):
            raise FieldError("milestones", f"{list(self.milestones)}: need ascending fractions")
        if not self.force_coef + self.energy_coef > 0:
            raise FieldError("force_coef", "force_coef and energy_coef are both 0: no loss")
        self._check_energy_reference()
        object.__setattr__(
            self, "element_energies", {str(k): float(v) for k, v in self.element_energies.items()}
        )
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "tag_weights", tuple(float(w) for w in self.tag_weights))

    def _check_energy_reference(self) -> None:
        """``element_energies`` and ``isolated_atoms`` only where the reference uses them."""
        given = bool(self.element_energies)
        if given and self.energy_reference == "mean":
            raise FieldError(
                "element_energies",
                "given but energy_reference is 'mean' (they need 'per_element' or 'isolated')",
            )
        if self.isolated_atoms is not None and self.energy_reference != "isolated":
            raise FieldError(
                "isolated_atoms", f"given but energy_reference is {self.energy_reference!r}"
            )
        if self.energy_reference == "isolated" and given == (self.isolated_atoms is not None):
            raise FieldError(
                "energy_reference",
                "'isolated' needs the isolated-atom energies as element_energies (by element "
                "symbol) or as isolated_atoms (a file of single-atom frames), one of the two",
            )
        unknown = sorted(set(self.element_energies) - set(atomic_numbers))
        if unknown:
            raise FieldError("element_energies", f"unknown elements {unknown}")

    @property
    def conservative_schedule(self) -> Schedule:
        """The conservative phase's own schedule (``conservative_lr`` > 0), its step
        counted from the phase's start and its progress over the phase: the run's, with
        its own rate and warm-up, annealed by a cosine."""
        return dataclasses.replace(
            self.schedule,
            lr=self.conservative_lr,
            warmup_steps=self.conservative_warmup_steps,
            decay="cosine",
        )

    @property
    def schedule(self) -> Schedule:
        """The learning-rate schedule these settings define."""
        return Schedule(
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            warmup_start=self.warmup_start,
            decay=self.lr_decay,
            milestones=self.milestones,
            gamma=self.gamma,
            min_factor=self.min_lr_factor,
        )


#: The allowed values of every :class:`TrainConfig` field, checked before any work (one
#: line per field: a new field adds its line). Numbers are finite: NaN and inf are refused.
FIELD_CHECKS: dict[str, Check] = {
    "lr": Range(0, low_open=True),
    "weight_decay": Range(0),
    "warmup_steps": Range(0, integer=True),
    "warmup_start": Range(0, 1),  # a factor of lr: from warmup_start * lr up to lr
    "lr_decay": OneOf(get_args(LrDecay)),
    "milestones": Range(0, 1),  # fractions of the budget, ascending
    "gamma": Range(0, 1, low_open=True),
    "min_lr_factor": Range(0, 1),
    "batch_size": Range(1, integer=True),
    "eval_batch_size": Range(1, integer=True),
    "max_epochs": Range(1, integer=True),
    "max_steps": Range(0, integer=True),
    "eval_every": Range(0, integer=True),
    "time_budget_s": Range(0),
    "force_loss": OneOf(get_args(ForceLossKind)),
    "adsorbate_loss": OneOf((*get_args(ForceLossKind), None)),
    "loss_beta": Range(0, low_open=True),
    "adsorbate_beta": Range(0, low_open=True, optional=True),
    "loss_atoms": OneOf(get_args(LossAtoms)),
    "tag_weights": Range(0),  # per tag 0/1/2, not all 0
    "force_coef": Range(0),
    "energy_coef": Range(0),
    "clip_grad": Range(0),  # 0 = off
    "rotation_augment": Flag(),
    "amp": Flag(),
    "dev_fraction": Range(0, 1, high_open=True),
    "num_workers": Range(0, integer=True),
    "seed": Range(0, 2**32 - 1, integer=True),
    "energy_reference": OneOf(get_args(EnergyReference)),
    "element_energies": Range(),  # eV, any finite value
    "isolated_atoms": Text(optional=True),
    "conservative_finetune_steps": Range(0, integer=True),
    "conservative_lr": Range(0),  # 0 = the main schedule goes on
    "conservative_warmup_steps": Range(0, integer=True),
    "frame_averaging": OneOf(get_args(FrameMode)),
    "ema_decay": Range(0, 1, high_open=True),  # 0 = off
}


def make_loss(cfg: TrainConfig, model: ScaledModel) -> TrainLoss:
    """The loss in the model's normalised units (the wrapper's scales)."""
    return TrainLoss(
        kind=cfg.force_loss,
        atoms=cfg.loss_atoms,
        tag_weights=cfg.tag_weights,
        force_coef=cfg.force_coef,
        energy_coef=cfg.energy_coef,
        force_scale=float(model.get_buffer("force_scale")),
        energy_shift=float(model.get_buffer("energy_shift")),
        energy_scale=float(model.get_buffer("energy_scale")),
        beta=cfg.loss_beta,
        adsorbate_kind=cfg.adsorbate_loss,
        adsorbate_beta=cfg.adsorbate_beta,
    )


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML reads it: ``3`` -> 3, ``0.5`` -> 0.5, ``true``, ``[1, 2]``."""
    return yaml.safe_load(text)


def load_run_config(
    model_name: str, path: Path | None = None, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], TrainConfig]:
    """``(model kwargs, TrainConfig)`` of one training run.

    ``path``: an optional YAML file ``{model: {<constructor arg>: value}, train:
    {<TrainConfig field>: value}}``; missing entries take the defaults. ``overrides``:
    ``"model.hidden_channels=128"`` or ``"train.max_steps=500"`` strings applied on top.
    Unknown model arguments and training keys are refused, naming the key.
    """
    from forcenet.models import hyperparameters

    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "run config"
    extra = sorted(set(data) - {"model", "train"})
    if extra:
        raise ConfigError(unknown_keys_message(where, extra, ("model", "train")))
    model = dict(data.get("model") or {})
    train = dict(data.get("train") or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        section_name, _, name = key.partition(".")
        if not sep or not name or section_name not in ("model", "train"):
            raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        (model if section_name == "model" else train)[name] = parse_value(value)
    allowed = hyperparameters(model_name)
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ConfigError(unknown_keys_message(f"{where}: model {model_name}", unknown, allowed))
    return model, parse(TrainConfig, train, f"{where}: train")
