"""Join frame and graph records into one batch dict of tensors (see :mod:`forcenet.data.keys`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from forcenet.data import keys as K
from forcenet.data.offsets import OFFSET_TABLE

Batch = dict[str, Tensor]

_FLOAT32 = {K.POS, K.CELL, K.FORCES, K.CELL_OFFSETS, K.ENERGY, K.TOTAL_ENERGY}
_BOOL = {K.PBC, K.FIXED}


def _dtype(name: str) -> type:
    return np.float32 if name in _FLOAT32 else np.bool_ if name in _BOOL else np.int64


def _array(name: str, value) -> np.ndarray:
    return np.asarray(value).astype(_dtype(name), copy=False)


#: Where :func:`collate_arrays` puts each field: ``alloc(name, shape, dtype)`` returns an
#: array of that shape and dtype to fill (default: a new one).
Alloc = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]


def _new(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def collate_arrays(
    samples: Sequence[Mapping[str, np.ndarray | Tensor]],
    *,
    expand: bool = True,
    alloc: Alloc = _new,
) -> dict[str, np.ndarray]:
    """The batch of ``samples`` as numpy arrays (see :func:`collate`), each joined with one
    numpy call per field rather than a tensor per sample and field, straight into the
    arrays ``alloc`` gives (e.g. views of a shared-memory slot).

    Samples may carry their graph compact, as the graph store holds it (what
    :meth:`forcenet.data.dataset.FrameDataset.__getitems__` gives); ``expand`` turns it
    into ``edge_index`` and ``cell_offsets``, else the batch holds it compact too (see
    :func:`expand_graphs`)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]
    natoms = np.array([len(s[K.ATOMIC_NUMBERS]) for s in samples], dtype=np.int64)
    n_atoms, n_graphs = int(natoms.sum()), len(samples)
    out: dict[str, np.ndarray] = {}
    for name in K.ATOM_FIELDS:
        if name in first:
            parts = [_array(name, s[name]) for s in samples]
            dst = alloc(name, (n_atoms, *parts[0].shape[1:]), parts[0].dtype)
            out[name] = np.concatenate(parts, axis=0, out=dst)
    for name in K.GRAPH_LEVEL_FIELDS:
        if name in first:
            parts = [_array(name, s[name]) for s in samples]
            dst = alloc(name, (n_graphs, *parts[0].shape), parts[0].dtype)
            out[name] = np.stack(parts, axis=0, out=dst)
    starts = np.cumsum(natoms) - natoms
    if K.EDGE_INDEX in first:
        parts = [_array(K.EDGE_INDEX, s[K.EDGE_INDEX]) + starts[g] for g, s in enumerate(samples)]
        n_edges = sum(p.shape[1] for p in parts)
        dst = alloc(K.EDGE_INDEX, (2, n_edges), np.dtype(np.int64))
        out[K.EDGE_INDEX] = np.concatenate(parts, axis=1, out=dst)
        parts = [_array(K.CELL_OFFSETS, s[K.CELL_OFFSETS]).reshape(-1, 3) for s in samples]
        dst = alloc(K.CELL_OFFSETS, (n_edges, 3), np.dtype(np.float32))
        out[K.CELL_OFFSETS] = np.concatenate(parts, axis=0, out=dst)
    out[K.NATOMS] = alloc(K.NATOMS, (n_graphs,), np.dtype(np.int64))
    out[K.NATOMS][:] = natoms
    out[K.BATCH] = alloc(K.BATCH, (n_atoms,), np.dtype(np.int64))
    out[K.BATCH][:] = np.repeat(np.arange(n_graphs, dtype=np.int64), natoms)
    if K.NEIGHBORS in first:
        compact = _join_compact(samples)
        if expand:
            out.update(_expanded(compact, natoms, out[K.BATCH], alloc))
        else:
            out.update(compact)
    return out


def _join_compact(samples: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """The compact graphs of ``samples`` joined: neighbor indices stay local to their
    structure (shifted on expansion); offsets as one-byte codes unless a structure has
    offsets beyond the code range, then as int8 triples for all."""
    out = {
        K.NEIGHBOR_COUNTS: np.concatenate([np.asarray(s[K.NEIGHBOR_COUNTS]) for s in samples]),
        K.NEIGHBORS: np.concatenate([np.asarray(s[K.NEIGHBORS]) for s in samples]),
    }
    if all(K.OFFSET_CODES in s for s in samples):
        out[K.OFFSET_CODES] = np.concatenate([np.asarray(s[K.OFFSET_CODES]) for s in samples])
    else:
        out[K.CELL_OFFSETS] = np.concatenate(
            [
                OFFSET_TABLE[np.asarray(s[K.OFFSET_CODES])].astype(np.int8)
                if K.OFFSET_CODES in s
                else np.asarray(s[K.CELL_OFFSETS], dtype=np.int8)
                for s in samples
            ]
        )
    return out


_OFFSET_TABLE_F32 = OFFSET_TABLE.astype(np.float32)


def _expanded(
    compact: Mapping[str, np.ndarray], natoms: np.ndarray, batch: np.ndarray, alloc: Alloc
) -> dict[str, np.ndarray]:
    """``edge_index`` [2, E] int64 and ``cell_offsets`` [E, 3] float32 of a joined compact
    graph, written into the arrays ``alloc`` gives."""
    counts, neighbors = compact[K.NEIGHBOR_COUNTS], compact[K.NEIGHBORS]
    centres = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if len(centres) != len(neighbors):
        raise ValueError(f"{len(neighbors)} neighbors but the counts sum to {len(centres)}")
    starts = np.cumsum(natoms) - natoms
    edge_index = alloc(K.EDGE_INDEX, (2, len(neighbors)), np.dtype(np.int64))
    np.add(neighbors, starts[batch[centres]], out=edge_index[0], casting="unsafe")
    edge_index[1] = centres
    offsets = alloc(K.CELL_OFFSETS, (len(neighbors), 3), np.dtype(np.float32))
    if K.OFFSET_CODES in compact:
        _OFFSET_TABLE_F32.take(compact[K.OFFSET_CODES], axis=0, out=offsets, mode="clip")
    else:
        offsets[:] = compact[K.CELL_OFFSETS]
    return {K.EDGE_INDEX: edge_index, K.CELL_OFFSETS: offsets}


def expand_graphs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` (a batch) with a compact graph (per-atom neighbor counts,
    structure-local neighbor indices, offset codes or int8 offsets) replaced by
    ``edge_index`` [2, E] int64 and ``cell_offsets`` [E, 3] float32; unchanged without
    one. The edges are those of the graph store, in its order (by structure, then
    centre, then distance)."""
    if K.NEIGHBORS not in arrays:
        return arrays
    compact_keys = (K.NEIGHBOR_COUNTS, K.NEIGHBORS, K.OFFSET_CODES, K.CELL_OFFSETS)
    out = {k: v for k, v in arrays.items() if k not in compact_keys}
    out.update(_expanded(arrays, arrays[K.NATOMS], arrays[K.BATCH], _new))
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

    What a DataLoader worker sends by value (:func:`collate_packed`), its graph compact
    (about 2 bytes per edge instead of 28), and what a batch from a shared-memory slot
    is copied into when the DataLoader pins memory (:mod:`forcenet.data.transfer`).
    :meth:`unpack` gives the batch dict with the graph expanded (:func:`expand_graphs`);
    :meth:`pin_memory` (called by a DataLoader with ``pin_memory=True``) page-locks the
    buffer for asynchronous copies to the GPU.
    """

    def __init__(
        self, buffer: np.ndarray | Tensor, layout: tuple[tuple[str, str, tuple[int, ...], int], ...]
    ) -> None:
        self.buffer = buffer
        self.layout = layout  # (name, numpy dtype, shape, byte offset) per field

    def unpack(self) -> Batch:
        compact = any(name == K.NEIGHBORS for name, *_ in self.layout)
        if isinstance(self.buffer, Tensor) and not compact:
            # torch views of the (page-locked) buffer itself: the copy to the GPU then
            # knows the memory is pinned and keeps it until the copy is done
            return {
                name: self.buffer[offset : offset + _nbytes(dtype_str, shape)]
                .view(_TORCH_DTYPES[dtype_str])
                .reshape(shape)
                for name, dtype_str, shape, offset in self.layout
            }
        arrays: dict[str, np.ndarray] = {}
        buffer = self.buffer.numpy() if isinstance(self.buffer, Tensor) else self.buffer
        for name, dtype_str, shape, offset in self.layout:
            raw = buffer[offset : offset + _nbytes(dtype_str, shape)]
            arrays[name] = raw.view(np.dtype(dtype_str)).reshape(shape)
        return {name: torch.from_numpy(a) for name, a in expand_graphs(arrays).items()}

    def pin_memory(self) -> PackedBatch:
        buffer = self.buffer if isinstance(self.buffer, Tensor) else torch.from_numpy(self.buffer)
        return PackedBatch(buffer.pin_memory(), self.layout)


def _nbytes(dtype_str: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * np.dtype(dtype_str).itemsize


_TORCH_DTYPES = {
    np.dtype(np.float32).str: torch.float32,
    np.dtype(np.int64).str: torch.int64,
    np.dtype(np.bool_).str: torch.bool,
}


def pack_layout(arrays: Mapping[str, np.ndarray]) -> tuple[tuple, int]:
    """The :class:`PackedBatch` layout of ``arrays`` (name, dtype, shape, byte offset per
    field, each aligned to 8 bytes) and the bytes it needs."""
    layout, offset = [], 0
    for name, a in arrays.items():
        layout.append((name, a.dtype.str, tuple(int(d) for d in a.shape), offset))
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    return tuple(layout), offset


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> PackedBatch:
    """``arrays`` copied into one numpy byte buffer (:class:`PackedBatch`)."""
    layout, nbytes = pack_layout(arrays)
    buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
    for (_, _, _, start), a in zip(layout, arrays.values(), strict=True):
        buffer[start : start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return PackedBatch(buffer, layout)


def collate_packed(samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> PackedBatch:
    """:func:`collate` into one byte buffer (:class:`PackedBatch`), the graph left compact
    (about 2 bytes per edge instead of 28): what a worker sends by value."""
    return pack_arrays(collate_arrays(samples, expand=False))


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
