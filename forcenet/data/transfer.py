"""Batches from DataLoader workers to the main process through reused shared memory.

On a 2-core machine the transfer, not the reading, decided whether workers help: torch
sends a batch as a tensor per field, each in a shared-memory segment created for it
(about 0.35 ms per MB) and passed as a file descriptor through a helper socket (about
0.9 ms per batch), as much as reading the batch. Here every worker writes its collated
batches into slots of a :class:`SlotRing`, shared memory allocated once before the
workers start, and sends only the slot number and the layout (a few hundred bytes), for
a chunk of :data:`CHUNK` batches per message (torch's queues cost about 0.5 ms per
message on each side). The main process copies the batch out of the slot (0.05-0.1 ms for an OC20-sized batch of
16, into page-locked memory when the DataLoader pins) and frees the slot; nothing it
holds ever points into a slot, so a slot is never rewritten under a batch in use.

A batch larger than a slot, or one made while all of the worker's slots are taken,
travels by value instead (:class:`~forcenet.data.batch.PackedBatch`, its graph compact).
"""

from __future__ import annotations

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
    expand_graphs,
    pack_arrays,
    pack_layout,
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
        """Free every slot (between epochs: batches still outstanding are discarded)."""
        self.busy.zero_()

    def close(self) -> None:
        _RINGS.pop(self.id, None)


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
        return self._take(pin=False).unpack()

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
        compact = collate_arrays(samples, expand=False)
        if info is None or self.ring is None:  # not in a worker, or no slots
            return pack_arrays(compact)
        arrays = expand_graphs(compact)
        layout, nbytes = pack_layout(arrays)
        slot = self.ring.acquire(info.id) if nbytes <= self.ring.slot_bytes else None
        if slot is None:
            return pack_arrays(compact)
        view = self.ring.slot(slot).numpy()
        for (_, _, _, start), a in zip(layout, arrays.values(), strict=True):
            view[start : start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return SlotBatch(self.ring.id, slot, layout, nbytes)


#: Batches per worker task.
CHUNK = 4


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
