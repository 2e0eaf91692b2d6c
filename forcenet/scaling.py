"""The label scaling: how a model that predicts normalised labels returns physical units.

:class:`ScaledModel` wraps every trained model; its buffers hold the normalisation, so a
checkpoint's state dict carries it. :func:`label_stats` measures it on a training set (the
force RMS; per-element reference energies, then the energy mean/std) and
:func:`set_scales` puts it into the wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Sized
from typing import Any, Literal

import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols
from torch import Tensor, nn
from torch.utils.data import Dataset

from forcenet.data import keys as K
from forcenet.data.frame import MAX_Z
from forcenet.frames import FrameAveraging, FrameMode


class ScaledModel(nn.Module):
    """Wraps a model that predicts normalised labels and returns physical units.

    ``forces = force_scale * inner forces`` (eV/Å) and
    ``energy = energy_scale * inner energy + energy_shift + sum_i element_energies[Z_i]``
    (eV, per structure; the per-element reference energies are 0 unless fitted, see
    :func:`label_stats`). For models whose forces are -dE/dpos the two
    scales must be equal so the forces stay the gradient of the energy; the per-element
    term does not depend on positions, so it leaves the forces alone. The constants are
    buffers, so they travel in the state dict. ``frame_averaging`` (direct-force models):
    the model runs in the principal-axis frames of each structure
    (:class:`forcenet.frames.FrameAveraging`), which makes it exactly covariant.
    """

    force_scale: Tensor  # [] buffer, eV/Å
    energy_scale: Tensor  # [] buffer, eV
    energy_shift: Tensor  # [] buffer, eV
    element_energies: Tensor  # [MAX_Z + 1] float64 buffer, eV per atom of element Z

    def __init__(
        self,
        model: nn.Module,
        *,
        force_scale: float = 1.0,
        energy_scale: float = 1.0,
        energy_shift: float = 0.0,
        frame_averaging: FrameMode = "none",
    ) -> None:
        super().__init__()
        self.model = model
        # the instance's: ForceNet(forces="gradient") is a gradient model, its class is not
        self.energy_from_gradient = bool(getattr(model, "energy_from_gradient", False))
        if self.energy_from_gradient and force_scale != energy_scale:
            raise ValueError("a gradient-force model needs force_scale == energy_scale")
        if frame_averaging != "none" and self.energy_from_gradient:
            raise ValueError(
                f"frame_averaging={frame_averaging!r} is for direct-force models (ForceNet, "
                "GNS): the forces of an energy model are already covariant"
            )
        self.frame_averaging = frame_averaging
        # no parameters or buffers: the state dict is the same with or without frames
        self.frames = FrameAveraging(frame_averaging) if frame_averaging != "none" else None
        self.register_buffer("force_scale", torch.tensor(float(force_scale)))
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale)))
        self.register_buffer("energy_shift", torch.tensor(float(energy_shift)))
        self.register_buffer("element_energies", torch.zeros(MAX_Z + 1, dtype=torch.float64))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.model(batch) if self.frames is None else self.frames(self.model, batch)
        scaled = {K.OUT_FORCES: out[K.OUT_FORCES] * self.force_scale}  # [N, 3] eV/Å
        if K.OUT_ENERGY in out:
            energy = out[K.OUT_ENERGY] * self.energy_scale + self.energy_shift  # [G] eV
            per_atom = self.element_energies[batch[K.ATOMIC_NUMBERS]]  # [N] float64
            reference = torch.zeros(
                energy.shape[0], dtype=per_atom.dtype, device=per_atom.device
            ).index_add_(0, batch[K.BATCH], per_atom)  # [G] float64
            scaled[K.OUT_ENERGY] = energy + reference.to(energy.dtype)
        return scaled

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints from before the per-element references: all 0, as they were trained
        state_dict.setdefault(prefix + "element_energies", torch.zeros_like(self.element_energies))
        super()._load_from_state_dict(state_dict, prefix, *args)


def element_energies(model: ScaledModel) -> dict[str, float]:
    """The wrapper's non-zero per-element reference energies, by element symbol (eV)."""
    values = model.element_energies.tolist()
    return {chemical_symbols[z]: float(e) for z, e in enumerate(values) if e != 0.0}


def label_stats(
    dataset: Dataset | Sequence[Mapping[str, Any]],
    *,
    reference: Literal["mean", "per_element"] = "mean",
    element_energies: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Normalisation constants of a training set.

    ``force_rms`` (eV/Å): root mean square of the free-atom force components (the std
    about the physical mean 0); ``energy_mean``/``energy_std`` (eV): of the per-structure
    energy labels (std 1 if there is a single frame) less, with ``reference``
    ``"per_element"``, the per-element reference energies ``element_energies`` (``{Z: eV}``
    in the result): given by element symbol, or else fitted by :func:`fit_element_energies`.
    With ``"mean"`` the result has no ``element_energies`` (all 0).
    """
    sq, n_comp, energies, numbers = 0.0, 0, [], []
    if not isinstance(dataset, Sized):
        raise TypeError(f"training needs a dataset with a length, got {type(dataset).__name__}")
    for i in range(len(dataset)):
        sample = dataset[i]
        free = ~np.asarray(sample[K.FIXED], dtype=bool)
        forces = np.asarray(sample[K.FORCES], dtype=np.float64)[free]
        sq += float(np.square(forces).sum())
        n_comp += forces.size
        energies.append(float(sample[K.ENERGY]))
        numbers.append(np.asarray(sample[K.ATOMIC_NUMBERS], dtype=np.int64))
    if n_comp == 0:
        raise ValueError("training set has no free atoms: cannot normalise forces")
    e = np.asarray(energies)
    stats: dict[str, Any] = {"force_rms": math.sqrt(sq / n_comp)}
    if reference == "per_element":
        counts = composition_counts(numbers)
        refs = (
            given_element_energies(element_energies, counts)
            if element_energies
            else fit_element_energies(counts, e)
        )
        table = np.zeros(counts.shape[1])
        for z, value in refs.items():
            table[z] = value
        e = e - counts @ table
        stats["element_energies"] = refs
    elif reference != "mean":
        raise ValueError(f"energy reference must be 'mean' or 'per_element', got {reference!r}")
    std = float(e.std()) if len(e) > 1 and e.std() > 1e-8 else 1.0
    stats.update(energy_mean=float(e.mean()), energy_std=std)
    return stats


def composition_counts(numbers: Sequence[np.ndarray]) -> np.ndarray:
    """Atoms of each element per structure: [n_structures, MAX_Z + 1] float64, column Z."""
    counts = np.zeros((len(numbers), MAX_Z + 1))
    for row, z in enumerate(numbers):
        if len(z) and (z.min() < 1 or z.max() > MAX_Z):
            raise ValueError(f"training structure {row}: atomic numbers outside 1..{MAX_Z}")
        counts[row] = np.bincount(z, minlength=MAX_Z + 1)
    return counts


def fit_element_energies(counts: np.ndarray, energies: np.ndarray) -> dict[int, float]:
    """Per-element reference energies e_Z (eV) of the least-squares fit E ~ sum_Z n_Z e_Z.

    ``counts`` [S, MAX_Z + 1] (:func:`composition_counts`), ``energies`` [S] (eV). Only the
    elements present take part; when compositions are collinear (e.g. one molecule) the
    minimum-norm solution is taken, whose sums still fit the energies as well as any.
    """
    present = np.flatnonzero(counts.sum(axis=0) > 0)
    coef, *_ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
    return {int(z): float(c) for z, c in zip(present, coef, strict=True)}


def given_element_energies(given: Mapping[str, float], counts: np.ndarray) -> dict[int, float]:
    """``{Z: eV}`` from per-element energies by symbol; every element present needs one."""
    refs = {atomic_numbers[symbol]: float(value) for symbol, value in given.items()}
    missing = [
        chemical_symbols[z] for z in np.flatnonzero(counts.sum(axis=0) > 0) if int(z) not in refs
    ]
    if missing:
        raise ValueError(f"element_energies: no value for training elements {missing}")
    return {z: v for z, v in sorted(refs.items()) if z <= MAX_Z}


def describe_element_energies(refs: Mapping[int, float]) -> str:
    """``"H -3.391, O -14.27 eV"``: the per-element reference energies for a log line."""
    return ", ".join(f"{chemical_symbols[z]} {v:.4g}" for z, v in sorted(refs.items())) + " eV"


def set_scales(model: ScaledModel, stats: dict[str, Any]) -> None:
    """Put the training-set normalisation (:func:`label_stats`) into the wrapper's buffers.

    Direct-force models: forces scaled by the force RMS. Gradient-force models: energy and
    forces share one scale (forces are -dE/dpos), the force RMS, so forces start O(1).
    """
    model.get_buffer("force_scale").fill_(stats["force_rms"])
    model.get_buffer("energy_shift").fill_(stats["energy_mean"])
    table = model.get_buffer("element_energies")
    table.zero_()
    for z, value in stats.get("element_energies", {}).items():
        table[int(z)] = value
    e_scale = stats["force_rms"] if model.energy_from_gradient else stats["energy_std"]
    model.get_buffer("energy_scale").fill_(e_scale)
