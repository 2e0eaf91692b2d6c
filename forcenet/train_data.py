"""What training takes from its data: the dev slice (whole systems held out of the
training split, by ``sid``; frames when there are too few systems) and the label
normalisation (force RMS; per-element reference energies, then the energy mean/std) put
into the :class:`forcenet.checkpoint.ScaledModel` wrapper."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from torch.utils.data import Dataset

from forcenet import checkpoint as C
from forcenet.data import keys as K
from forcenet.data.frame import MAX_Z

#: Fewer training systems than this and the dev slice is drawn by frame, not by system:
#: with one long trajectory (a single ``sid``) a system split would leave no dev slice,
#: and with a handful of systems it would hold out a large, lumpy share.
MIN_DEV_SYSTEMS = 10


def _unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from a hash of (seed, key)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def dev_split_by_frame(sids: Sequence[int]) -> bool:
    """Whether :func:`dev_split` holds out frames (fewer than :data:`MIN_DEV_SYSTEMS`
    systems, at least two frames) instead of whole systems."""
    return len({int(s) for s in sids}) < MIN_DEV_SYSTEMS and len(sids) > 1


def dev_split(sids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices) with whole systems (``sid``) held out for the dev slice.

    A system is in the dev slice when a hash of (seed, sid) falls below ``fraction``, so the
    choice of one system does not depend on which other systems are present. With
    ``fraction`` > 0 at least one system (the smallest hash) is held out.

    With fewer than :data:`MIN_DEV_SYSTEMS` systems (e.g. one MD trajectory, one ``sid``)
    frames are held out instead: frame ``i`` when a hash of (seed, ``frame``, i) falls below
    ``fraction``, at least one, never all. Frames of one trajectory are correlated, so such a
    dev MAE is optimistic; it still selects the checkpoint and shows divergence.
    """
    if dev_split_by_frame(sids):
        units = [_unit(seed, f"frame{i}") for i in range(len(sids))]
        held = {i for i, u in enumerate(units) if u < fraction}
        if fraction > 0 and not held:
            held = {min(range(len(sids)), key=units.__getitem__)}
        if len(held) == len(sids):  # keep something to train on
            held.discard(max(held, key=units.__getitem__))
        return [i for i in range(len(sids)) if i not in held], sorted(held)
    systems = sorted({int(s) for s in sids})
    dev = {s for s in systems if _unit(seed, str(int(s))) < fraction}
    if fraction > 0 and not dev and len(systems) > 1:
        dev = {min(systems, key=lambda s: _unit(seed, str(int(s))))}
    dev_idx = [i for i, s in enumerate(sids) if int(s) in dev]
    train_idx = [i for i, s in enumerate(sids) if int(s) not in dev]
    return train_idx, dev_idx


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``; a TypeError for a dataset without a length (an iterable one)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"training needs a dataset with a length, got {type(dataset).__name__}")
    return len(dataset)


def label_stats(
    dataset: Dataset,
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
    for i in range(dataset_size(dataset)):
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


def read_sids(frames_dir: Path) -> list[int]:
    """The ``sid`` of every frame of a frame store, in dataset order (frames only, no graphs)."""
    from forcenet.data.dataset import FrameDataset

    frames = FrameDataset(frames_dir)
    return [int(frames[i][K.SID]) for i in range(len(frames))]


def set_scales(model: C.ScaledModel, stats: dict[str, Any]) -> None:
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
