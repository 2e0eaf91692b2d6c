"""Batches from DataLoader workers to the main process through reused shared memory.

On a 2-core machine the transfer, not the reading, decided whether workers help: torch
sends a batch as a tensor per field, each in a shared-memory segment created for it
(about 0.35 ms per MB) and passed as a file descriptor through a helper socket (about
0.9 ms per batch), as much as reading the batch. Here every worker writes its collated
batches into slots of a :class:`SlotRing`, shared memory allocated once before the
workers start, and sends only the slot number and the layout (a few hundred bytes), for
a chunk of :data:`CHUNK` batches per message (torch's queues cost about 0.5 ms per
message on each side). The main process builds the batch's tensors over the slot
without a copy, and the slot is freed only when the last array or tensor over it is
gone (or copied straight into page-locked memory when the DataLoader pins, and freed),
so a slot is never rewritten under a batch in use.

A batch larger than a slot, or one made while all of the worker's slots are taken,
travels by value instead (:class:`~forcenet.data.batch.PackedBatch`, its graph compact).
"""

from __future__ import annotations

import ctypes
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from forcenet.data.batch import (
    Batch,
    PackedBatch,
    collate_arrays,
    pack_arrays,
)

#: The rings of this process's loaders, by id: a :class:`SlotBatch` names its ring.
_RINGS: dict[str, SlotRing] = {}


class SlotRing:
    """``slots_per_worker`` slots of ``slot_bytes`` shared memory for each of ``workers``.

    Slot ``s`` belongs to worker ``s // slots_per_worker`` only; ``busy[s]`` is set by
    that worker when it fills the slot and cleared by the main process once it has
    copied the batch out. Create it in the main process before the workers start.
    """

    def __init__(self, workers: int, *, slots_per_worker: int = 4, slot_bytes: int = 4 << 20):
        if workers < 1 or slots_per_worker < 1 or slot_bytes < 1:
            raise ValueError("a slot ring needs workers, slots and bytes >= 1")
        self.id = uuid.uuid4().hex
        self.workers, self.slots_per_worker, self.slot_bytes = workers, slots_per_worker, slot_bytes
        count = workers * slots_per_worker
        self.data = torch.empty(count * slot_bytes, dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros(count, dtype=torch.int32).share_memory_()
        self.leased: set[int] = set()  # main process: slots that arrays still point into
        _RINGS[self.id] = self

    def acquire(self, worker: int) -> int | None:
        """A free slot of ``worker``, now marked busy; None when all are taken."""
        first = worker * self.slots_per_worker
        busy = self.busy.numpy()
        for slot in range(first, first + self.slots_per_worker):
            if busy[slot] == 0:
                busy[slot] = 1
                return slot
        return None

    def slot(self, slot: int) -> Tensor:
        start = slot * self.slot_bytes
        return self.data[start : start + self.slot_bytes]

    def release(self, slot: int) -> None:
        self.busy[slot] = 0

    def release_all(self) -> None:
        """Free every slot no batch in this process points into (between epochs: batches
        still outstanding from an abandoned one are discarded by torch)."""
        busy = self.busy.numpy()
        for slot in range(len(busy)):
            if slot not in self.leased:
                busy[slot] = 0

    def lease(self, slot: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of ``slot`` as a numpy byte array that frees the slot when
        the last array or tensor over it is gone (no copy)."""
        start = slot * self.slot_bytes
        raw = (ctypes.c_char * max(nbytes, 1)).from_address(self.data.data_ptr() + start)
        raw._lease = _Lease(self, slot)  # type: ignore[attr-defined]  # lives as long as raw
        return np.frombuffer(raw, dtype=np.uint8, count=nbytes)  # type: ignore[call-overload]

    def close(self) -> None:
        _RINGS.pop(self.id, None)


class _Lease:
    """Frees ``slot`` of ``ring`` when collected: owned by the buffer object every array
    over the slot keeps alive (numpy collapses view chains onto it, torch tensors made
    from those arrays hold them)."""

    def __init__(self, ring: SlotRing, slot: int) -> None:
        self.ring, self.slot = ring, slot
        ring.leased.add(slot)

    def __del__(self) -> None:
        self.ring.leased.discard(self.slot)
        self.ring.release(self.slot)


class SlotBatch:
    """A batch waiting in a slot of the ring ``ring_id``: what the worker sends."""

    def __init__(self, ring_id: str, slot: int, layout: tuple, nbytes: int) -> None:
        self.ring_id, self.slot, self.layout, self.nbytes = ring_id, slot, layout, nbytes

    def _take(self, pin: bool) -> PackedBatch:
        ring = _RINGS[self.ring_id]
        out = torch.empty(max(self.nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        # numpy's copy: one thread (torch's copy_ wakes its thread pool, which spins
        # against the workers on a small machine: 20x slower here)
        np.copyto(out.numpy()[: self.nbytes], ring.slot(self.slot).numpy()[: self.nbytes])
        ring.release(self.slot)
        return PackedBatch(out, self.layout)

    def unpack(self) -> Batch:
        """The batch, its tensors views of the slot (freed once they are all gone)."""
        ring = _RINGS[self.ring_id]
        return PackedBatch(ring.lease(self.slot, self.nbytes), self.layout).unpack()

    def pin_memory(self) -> PackedBatch:
        """Copied straight into page-locked memory (the DataLoader's pinning thread)."""
        return self._take(pin=True)


class RingCollate:
    """The DataLoader ``collate_fn`` of a loader with workers.

    A worker task is a chunk of up to :data:`CHUNK` batches (:class:`ChunkSampler`: the
    per-message cost of torch's queues is then paid once per chunk); each batch of
    ``batch_size`` is collated (graph expanded) into a free slot of ``ring`` and sent as
    a :class:`SlotBatch`, or else as a compact :class:`PackedBatch` by value. Returns the
    list of the chunk's batches, in order.
    """

    def __init__(self, ring: SlotRing | None, batch_size: int) -> None:
        self.ring, self.batch_size = ring, batch_size

    def __call__(self, samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> list:
        return [self._one(part) for part in self._split(samples)]

    def _split(self, samples: Sequence) -> list[Sequence]:
        return [samples[k : k + self.batch_size] for k in range(0, len(samples), self.batch_size)]

    def _one(self, samples: Sequence[Mapping[str, np.ndarray | Tensor]]) -> Any:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        slot = self.ring.acquire(info.id) if info is not None and self.ring is not None else None
        if slot is None:  # not in a worker, no slots, or all taken
            return pack_arrays(collate_arrays(samples, expand=False))
        assert self.ring is not None
        place = _SlotAlloc(self.ring.slot(slot).numpy())
        try:
            collate_arrays(samples, alloc=place)
        except _NoRoom:
            self.ring.release(slot)
            return pack_arrays(collate_arrays(samples, expand=False))
        return SlotBatch(self.ring.id, slot, tuple(place.layout), place.used)


class _NoRoom(Exception):
    """A batch larger than its slot."""


class _SlotAlloc:
    """Places a batch's fields one after the other in a slot (8-byte aligned), recording
    the layout; raises :class:`_NoRoom` when the slot is full."""

    def __init__(self, slot: np.ndarray) -> None:
        self.slot, self.used = slot, 0
        self.layout: list[tuple[str, str, tuple[int, ...], int]] = []

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        start = -(-self.used // 8) * 8
        nbytes = math.prod(shape) * dtype.itemsize
        if start + nbytes > len(self.slot):
            raise _NoRoom
        self.used = start + nbytes
        self.layout.append((name, dtype.str, tuple(int(d) for d in shape), start))
        return self.slot[start : start + nbytes].view(dtype).reshape(shape)


#: Batches per worker task. On OC20-sized frames (2 workers, 2 cores) 8 gave 2.1x the
#: graphs/s of no workers against 1.8x for 4 and 1.7x for 2: fewer messages, fewer wake-ups.
CHUNK = 8


class ChunkSampler(Sampler[list[int]]):
    """The indices of up to ``chunk`` consecutive batches of ``batches`` at a time, as
    one flat list (the order is kept; every batch but the epoch's last is full)."""

    def __init__(self, batches: Sampler[list[int]], chunk: int = CHUNK) -> None:
        self.batches, self.chunk = batches, chunk

    def __iter__(self) -> Iterator[list[int]]:
        pending: list[int] = []
        count = 0
        for batch in self.batches:
            pending.extend(batch)
            count += 1
            if count == self.chunk:
                yield pending
                pending, count = [], 0
        if pending:
            yield pending

    def __len__(self) -> int:
        return -(-len(self.batches) // self.chunk)  # type: ignore[arg-type]
