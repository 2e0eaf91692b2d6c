"""What training takes from its data: the dev slice (whole systems held out of the
training split, by ``sid``) and the label normalisation (force RMS, energy mean/std) put
into the :class:`forcenet.checkpoint.ScaledModel` wrapper."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence, Sized
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from forcenet import checkpoint as C
from forcenet.data import keys as K


def dev_split(sids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices) with whole systems (``sid``) held out for the dev slice.

    A system is in the dev slice when a hash of (seed, sid) falls below ``fraction``, so the
    choice of one system does not depend on which other systems are present. With
    ``fraction`` > 0 at least one system (the smallest hash) is held out.
    """

    def unit(sid: int) -> float:
        digest = hashlib.blake2b(f"{seed}:{int(sid)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    systems = sorted({int(s) for s in sids})
    dev = {s for s in systems if unit(s) < fraction}
    if fraction > 0 and not dev and len(systems) > 1:
        dev = {min(systems, key=unit)}
    dev_idx = [i for i, s in enumerate(sids) if int(s) in dev]
    train_idx = [i for i, s in enumerate(sids) if int(s) not in dev]
    return train_idx, dev_idx


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``; a TypeError for a dataset without a length (an iterable one)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"training needs a dataset with a length, got {type(dataset).__name__}")
    return len(dataset)


def label_stats(dataset: Dataset) -> dict[str, float]:
    """Normalisation constants of a training set.

    ``force_rms`` (eV/Å): root mean square of the free-atom force components (the std
    about the physical mean 0); ``energy_mean``/``energy_std`` (eV): of the referenced
    per-structure energies (std 1 if there is a single frame).
    """
    sq, n_comp, energies = 0.0, 0, []
    for i in range(dataset_size(dataset)):
        sample = dataset[i]
        free = ~np.asarray(sample[K.FIXED], dtype=bool)
        forces = np.asarray(sample[K.FORCES], dtype=np.float64)[free]
        sq += float(np.square(forces).sum())
        n_comp += forces.size
        energies.append(float(sample[K.ENERGY]))
    if n_comp == 0:
        raise ValueError("training set has no free atoms: cannot normalise forces")
    e = np.asarray(energies)
    std = float(e.std()) if len(e) > 1 and e.std() > 1e-8 else 1.0
    return {"force_rms": math.sqrt(sq / n_comp), "energy_mean": float(e.mean()), "energy_std": std}


def read_sids(frames_dir: Path) -> list[int]:
    """The ``sid`` of every frame of a frame store, in dataset order (frames only, no graphs)."""
    from forcenet.data.dataset import FrameDataset

    frames = FrameDataset(frames_dir)
    return [int(frames[i][K.SID]) for i in range(len(frames))]


def set_scales(model: C.ScaledModel, stats: dict[str, float]) -> None:
    """Put the training-set normalisation into the wrapper's buffers.

    Direct-force models: forces scaled by the force RMS. Gradient-force models: energy and
    forces share one scale (forces are -dE/dpos), the force RMS, so forces start O(1).
    """
    model.get_buffer("force_scale").fill_(stats["force_rms"])
    model.get_buffer("energy_shift").fill_(stats["energy_mean"])
    e_scale = stats["force_rms"] if model.energy_from_gradient else stats["energy_std"]
    model.get_buffer("energy_scale").fill_(e_scale)
