"""Join frame and graph records into one batch dict of tensors (see :mod:`forcenet.data.keys`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from forcenet.data import keys as K

Batch = dict[str, Tensor]

_FLOAT32 = {K.POS, K.CELL, K.FORCES, K.CELL_OFFSETS, K.ENERGY, K.TOTAL_ENERGY}
_BOOL = {K.PBC, K.FIXED}


def _dtype(name: str) -> type:
    return np.float32 if name in _FLOAT32 else np.bool_ if name in _BOOL else np.int64


def _array(name: str, value) -> np.ndarray:
    return np.asarray(value).astype(_dtype(name), copy=False)


def collate_arrays(samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> dict[str, np.ndarray]:
    """The batch of ``samples`` as numpy arrays (see :func:`collate`), each joined with one
    numpy call per field rather than a tensor per sample and field."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]
    natoms = np.array([len(s[K.ATOMIC_NUMBERS]) for s in samples], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name in K.ATOM_FIELDS:
        if name in first:
            out[name] = np.concatenate([_array(name, s[name]) for s in samples], axis=0)
    for name in K.GRAPH_LEVEL_FIELDS:
        if name in first:
            out[name] = np.stack([_array(name, s[name]) for s in samples], axis=0)
    if K.EDGE_INDEX in first:
        starts = np.cumsum(natoms) - natoms
        out[K.EDGE_INDEX] = np.concatenate(
            [_array(K.EDGE_INDEX, s[K.EDGE_INDEX]) + starts[g] for g, s in enumerate(samples)],
            axis=1,
        )
        out[K.CELL_OFFSETS] = np.concatenate(
            [_array(K.CELL_OFFSETS, s[K.CELL_OFFSETS]).reshape(-1, 3) for s in samples], axis=0
        )
    out[K.NATOMS] = natoms
    out[K.BATCH] = np.repeat(np.arange(len(samples), dtype=np.int64), natoms)
    return out


def collate(samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> Batch:
    """Batch samples, each a frame record merged with its graph record.

    Per-atom and per-edge fields are concatenated, per-graph fields stacked, and
    ``edge_index`` is shifted by the number of atoms before each graph. Adds
    ``batch`` [N] (graph index of each atom) and ``natoms`` [G]. Fields missing from
    the first sample (e.g. labels at inference) are left out.
    """
    return {name: torch.from_numpy(a) for name, a in collate_arrays(samples).items()}


_ALIGN = 8  # bytes: every field starts at a multiple of its item size


class PackedBatch:
    """A collated batch in one contiguous byte buffer, with its layout.

    What a DataLoader worker sends (:func:`collate_packed`): one shared-memory buffer per
    batch crosses the process boundary instead of a tensor per field, which costs more
    than the reading on 2 cores. :meth:`unpack` gives the batch dict, every tensor a view
    of the buffer; :meth:`pin_memory` (called by a DataLoader with ``pin_memory=True``)
    page-locks the buffer for asynchronous copies to the GPU.
    """

    def __init__(self, buffer: Tensor, layout: tuple[tuple[str, str, tuple[int, ...], int], ...]):
        self.buffer = buffer
        self.layout = layout  # (name, numpy dtype, shape, byte offset) per field

    def unpack(self) -> Batch:
        out: Batch = {}
        for name, dtype_str, shape, offset in self.layout:
            dtype = np.dtype(dtype_str)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            raw = self.buffer[offset : offset + nbytes]
            out[name] = raw.view(_TORCH_DTYPES[dtype.str]).reshape(shape)
        return out

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(self.buffer.pin_memory(), self.layout)


_TORCH_DTYPES = {
    np.dtype(np.float32).str: torch.float32,
    np.dtype(np.int64).str: torch.int64,
    np.dtype(np.bool_).str: torch.bool,
}


def collate_packed(samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> PackedBatch:
    """:func:`collate` into one buffer (:class:`PackedBatch`); in a DataLoader worker the
    buffer is allocated in shared memory, so sending it copies nothing."""
    from torch.utils.data import get_worker_info

    arrays = collate_arrays(samples)
    layout, offset = [], 0
    for name, a in arrays.items():
        layout.append((name, a.dtype.str, tuple(int(d) for d in a.shape), offset))
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    buffer = torch.empty(max(offset, 1), dtype=torch.uint8)
    if get_worker_info() is not None:
        buffer.share_memory_()
    view = buffer.numpy()
    for (_, _, _, start), a in zip(layout, arrays.values(), strict=True):
        view[start : start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return PackedBatch(buffer, tuple(layout))


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
