"""The label scaling: how a model that predicts normalised labels returns physical units.

:class:`ScaledModel` wraps every trained model; its buffers hold the normalisation, so a
checkpoint's state dict carries it. :func:`label_stats` measures it on a training set (the
force RMS; per-element reference energies, then the energy mean/std) and
:func:`set_scales` puts it into the wrapper. The per-element reference energies are
fitted (:func:`least_squares_references`, with its rank), given, or isolated-atom energies
(:func:`read_isolated_energies`); structures with elements that have none are named
(:func:`referenced_elements`, :func:`unreferenced_warning`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path
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
    reference: Literal["mean", "per_element", "isolated"] = "mean",
    element_energies: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Normalisation constants of a training set.

    ``force_rms`` (eV/Å): root mean square of the free-atom force components (the std
    about the physical mean 0); ``energy_mean``/``energy_std`` (eV): of the per-structure
    energy labels (std 1 if there is a single frame) less, with ``reference``
    ``"per_element"`` or ``"isolated"``, the per-element reference energies
    ``element_energies`` (``{Z: eV}`` in the result). ``"per_element"``: given by element
    symbol, or else fitted by :func:`least_squares_references`. ``"isolated"``: the given
    isolated-atom energies, and for training elements without one the least-squares fit
    of what they leave. A fit adds ``element_fit`` ``{"elements": [Z, ...], "rank": r,
    "structures": S}`` (:func:`element_fit_warning` says when r is below the number of
    elements). With ``"mean"`` the result has no ``element_energies`` (all 0).
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
    if reference in ("per_element", "isolated"):
        counts = composition_counts(numbers)
        if reference == "isolated":
            refs, fit = isolated_references(element_energies or {}, counts, e)
        elif element_energies:
            refs, fit = given_element_energies(element_energies, counts), None
        else:
            refs, rank = least_squares_references(counts, e)
            fit = {"elements": sorted(refs), "rank": rank, "structures": len(e)}
        table = np.zeros(counts.shape[1])
        for z, value in refs.items():
            table[z] = value
        e = e - counts @ table
        stats["element_energies"] = refs
        if fit is not None:
            stats["element_fit"] = fit
    elif reference != "mean":
        raise ValueError(
            f"energy reference must be 'mean', 'per_element' or 'isolated', got {reference!r}"
        )
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
    """The e_Z of :func:`least_squares_references`, without the rank."""
    return least_squares_references(counts, energies)[0]


def least_squares_references(
    counts: np.ndarray, energies: np.ndarray
) -> tuple[dict[int, float], int]:
    """Per-element reference energies e_Z (eV) of the least-squares fit E ~ sum_Z n_Z e_Z,
    and the fit's rank.

    ``counts`` [S, MAX_Z + 1] (:func:`composition_counts`), ``energies`` [S] (eV). Only the
    elements present take part. The e_Z are determined only when the rank equals the
    number of elements: with fewer independent compositions (one molecule's MD: rank 1
    for 3 elements; 30 systems of 40 elements) the minimum-norm solution is taken, whose
    sums still fit the training energies as well as any, but whose e_Z mean nothing alone
    and give arbitrary references to other compositions.
    """
    present = np.flatnonzero(counts.sum(axis=0) > 0)
    coef, _, rank, _ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
    return {int(z): float(c) for z, c in zip(present, coef, strict=True)}, int(rank)


def isolated_references(
    given: Mapping[str, float], counts: np.ndarray, energies: np.ndarray
) -> tuple[dict[int, float], dict[str, Any] | None]:
    """``({Z: eV}, fit)``: the isolated-atom energies ``given`` by element symbol (all of
    them, so test elements absent from training keep theirs), and for the training
    elements without one, the fall-back: the least-squares fit of the energies they leave
    (``fit`` as in :func:`label_stats`; None when every training element has one)."""
    refs = {atomic_numbers[symbol]: float(value) for symbol, value in given.items()}
    refs = {z: v for z, v in sorted(refs.items()) if z <= MAX_Z}
    present = np.flatnonzero(counts.sum(axis=0) > 0)
    missing = [int(z) for z in present if int(z) not in refs]
    if not missing:
        return refs, None
    table = np.zeros(counts.shape[1])
    for z, value in refs.items():
        table[z] = value
    rest = np.zeros_like(counts)
    rest[:, missing] = counts[:, missing]
    fitted, rank = least_squares_references(rest, energies - counts @ table)
    fit = {"elements": missing, "rank": rank, "structures": len(energies), "fallback": True}
    return dict(sorted({**refs, **fitted}.items())), fit


def element_fit_warning(name: str, stats: Mapping[str, Any]) -> str | None:
    """The lines that report a least-squares fit of e_Z (:func:`label_stats`'s
    ``element_fit``): its rank, and a warning when it is below the number of elements."""
    fit = stats.get("element_fit")
    if not fit:
        return None
    elements = [chemical_symbols[z] for z in fit["elements"]]
    n, rank = len(elements), int(fit["rank"])
    what = (
        f"no isolated-atom energy for {', '.join(elements)}: fitted by least squares instead"
        if fit.get("fallback")
        else "per-element reference energies fitted by least squares"
    )
    line = f"train {name}: {what} on {fit['structures']} structures, rank {rank} of {n} elements"
    if rank >= n:
        return line
    return (
        f"{line}\nWARNING: train {name}: the training compositions determine only {rank} "
        f"of the {n} reference energies ({', '.join(elements)}): the fitted e_Z are one of "
        "many equally good solutions, not per-atom energies, and give arbitrary references "
        "to other compositions; give isolated-atom energies (energy_reference: isolated, "
        "with element_energies or isolated_atoms) for references that mean something"
    )


class IsolatedAtomsError(ValueError):
    """A file of isolated-atom energies that cannot be used; names the file and frame."""


def read_isolated_energies(path: Path) -> dict[str, float]:
    """``{symbol: eV}`` from an ASE-readable file (extxyz, traj, ...) of single-atom
    frames with energies (one per element; a repeated element must repeat its energy)."""
    import ase.io

    energies: dict[str, float] = {}
    index = -1
    try:
        for index, atoms in enumerate(ase.io.iread(str(path), index=":")):
            where = f"{path}: structure {index}"
            if len(atoms) != 1:
                raise IsolatedAtomsError(
                    f"{where}: {len(atoms)} atoms; isolated-atom energies need single-atom frames"
                )
            results = atoms.calc.results if atoms.calc is not None else {}
            energy = results.get("energy", atoms.info.get("energy"))
            if energy is None or not math.isfinite(float(energy)):
                raise IsolatedAtomsError(f"{where}: no finite energy (got {energy!r})")
            symbol = atoms.get_chemical_symbols()[0]
            if energies.get(symbol, float(energy)) != float(energy):
                raise IsolatedAtomsError(
                    f"{where}: a second energy for {symbol} ({float(energy)} eV, "
                    f"{energies[symbol]} eV before)"
                )
            energies[symbol] = float(energy)
    except IsolatedAtomsError:
        raise
    except Exception as exc:  # ASE raises many types for unreadable files
        raise IsolatedAtomsError(
            f"{path}: cannot read structure {index + 1} ({type(exc).__name__}: {exc})"
        ) from exc
    if not energies:
        raise IsolatedAtomsError(f"{path}: no structures in the file")
    return energies


def referenced_elements(model: nn.Module) -> frozenset[int] | None:
    """The Z that have a per-element reference energy in ``model`` (the non-zero entries
    of a :class:`ScaledModel`'s table); None for a model without references (trained
    with ``energy_reference: mean``, or not a ScaledModel), whose energies need none."""
    table = getattr(model, "element_energies", None)
    if not isinstance(table, Tensor) or not bool(table.any()):
        return None
    return frozenset(int(z) for z in torch.nonzero(table).flatten().tolist())


def unreferenced_warning(where: str, missing: Iterable[int], detail: str = "") -> str:
    """The warning for structures holding elements without a reference energy."""
    symbols = ", ".join(chemical_symbols[z] for z in sorted(missing))
    return (
        f"WARNING: {where}: {detail}elements without a reference energy ({symbols}): the "
        "training split held none of them, so the predicted energies lack their atoms' "
        "reference (errors of up to hundreds of eV); train on data holding them, or give "
        "isolated-atom energies (energy_reference: isolated)"
    )


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
