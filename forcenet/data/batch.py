"""Join frame and graph records into one batch dict of tensors (see :mod:`forcenet.data.keys`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from forcenet.data import keys as K

Batch = dict[str, Tensor]

_FLOAT32 = {K.POS, K.CELL, K.FORCES, K.CELL_OFFSETS, K.ENERGY, K.TOTAL_ENERGY}


def _as_tensor(name: str, value) -> Tensor:
    t = torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
    if name in _FLOAT32:
        return t.to(torch.float32)
    if name in (K.PBC, K.FIXED):
        return t.to(torch.bool)
    return t.to(torch.int64)


def collate(samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> Batch:
    """Batch samples, each a frame record merged with its graph record.

    Per-atom and per-edge fields are concatenated, per-graph fields stacked, and
    ``edge_index`` is shifted by the number of atoms before each graph. Adds
    ``batch`` [N] (graph index of each atom) and ``natoms`` [G]. Fields missing from
    the first sample (e.g. labels at inference) are left out.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]
    natoms = torch.tensor([len(s[K.ATOMIC_NUMBERS]) for s in samples], dtype=torch.int64)
    out: Batch = {}
    for name in K.ATOM_FIELDS:
        if name in first:
            out[name] = torch.cat([_as_tensor(name, s[name]) for s in samples], dim=0)
    for name in K.GRAPH_LEVEL_FIELDS:
        if name in first:
            out[name] = torch.stack([_as_tensor(name, s[name]) for s in samples], dim=0)
    if K.EDGE_INDEX in first:
        starts = torch.cumsum(natoms, 0) - natoms
        out[K.EDGE_INDEX] = torch.cat(
            [_as_tensor(K.EDGE_INDEX, s[K.EDGE_INDEX]) + starts[g] for g, s in enumerate(samples)],
            dim=1,
        )
        out[K.CELL_OFFSETS] = torch.cat(
            [_as_tensor(K.CELL_OFFSETS, s[K.CELL_OFFSETS]).reshape(-1, 3) for s in samples], dim=0
        )
    out[K.NATOMS] = natoms
    out[K.BATCH] = torch.repeat_interleave(torch.arange(len(samples)), natoms)
    return out


def first_graphs(batch: Batch, n: int) -> Batch:
    """The first ``n`` structures of a collated batch (all of it when it holds fewer):
    their atoms, their edges and their per-graph fields, indices unchanged."""
    natoms = batch[K.NATOMS]
    if n >= len(natoms):
        return batch
    n_atoms = int(natoms[:n].sum())
    out: Batch = {}
    for name, value in batch.items():
        if name in K.ATOM_FIELDS or name == K.BATCH:
            out[name] = value[:n_atoms]
        elif name in K.GRAPH_LEVEL_FIELDS or name == K.NATOMS:
            out[name] = value[:n]
        elif name not in (K.EDGE_INDEX, K.CELL_OFFSETS):
            out[name] = value
    if K.EDGE_INDEX in batch:
        keep = batch[K.EDGE_INDEX][1] < n_atoms  # edges whose centre is kept
        out[K.EDGE_INDEX] = batch[K.EDGE_INDEX][:, keep]
        out[K.CELL_OFFSETS] = batch[K.CELL_OFFSETS][keep]
    return out


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """A new batch dict with every tensor moved to ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
