"""Batches from loader workers: through shared-memory slots, by value when they do not
fit, always the batches a loader without workers gives, and never rewritten in use."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from test_dataset import _dataset, stores  # noqa: F401  (the module's store fixture)
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from forcenet.data import keys as K
from forcenet.data.batch import PackedBatch, collate, collate_arrays, expand_graphs
from forcenet.data.dataset import BatchLoader, make_loader
from forcenet.data.transfer import ChunkSampler, RingCollate, SlotBatch, SlotRing, _SlotAlloc


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def _loader(ds, ring: SlotRing, workers: int) -> BatchLoader:
    batches = BatchSampler(SequentialSampler(ds), 4, False)
    loader = DataLoader(
        ds,
        batch_sampler=ChunkSampler(batches, 2),  # 2 batches per worker task
        num_workers=workers,
        collate_fn=RingCollate(ring, 4),
    )
    return BatchLoader(loader, ring, batches=len(batches))


@pytest.mark.parametrize("slot_bytes", [4 << 20, 64])  # fits / never fits: sent by value
def test_workers_give_the_batches_of_a_loader_without_workers(stores, slot_bytes):  # noqa: F811
    ds = _dataset(stores)
    expected = [collate([ds[i] for i in range(s, min(s + 4, len(ds)))]) for s in (0, 4, 8)]
    ring = SlotRing(2, slots_per_worker=2, slot_bytes=slot_bytes)
    loader = _loader(ds, ring, workers=2)
    got = list(loader)
    assert len(got) == len(expected) == len(loader)
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    del got, a, b
    gc.collect()
    assert int(ring.busy.sum()) == 0  # every slot freed once no batch points into it


def test_a_slot_is_not_reused_while_a_batch_points_into_it(stores):  # noqa: F811
    """The batch's tensors are views of the slot (no copy): the slot stays taken, even
    across an epoch start, until the last of them, views of views included, is gone."""
    ds = _dataset(stores)
    ring = SlotRing(1, slots_per_worker=1)
    samples = ds.__getitems__([0, 1, 2])
    place = _SlotAlloc(ring.slot(0).numpy())
    collate_arrays(samples, alloc=place)
    assert ring.acquire(0) == 0
    batch = SlotBatch(ring.id, 0, tuple(place.layout), place.used).unpack()
    _same(batch, collate(samples))
    pos = batch[K.POS][2:5]  # a view that outlives the batch dict
    del batch
    gc.collect()
    ring.release_all()  # a new epoch starts: a slot still in use is kept
    assert ring.acquire(0) is None and int(ring.busy[0]) == 1
    expected = pos.clone()
    del pos
    gc.collect()
    assert int(ring.busy[0]) == 0 and ring.acquire(0) == 0
    torch.testing.assert_close(expected, collate(samples)[K.POS][2:5], rtol=0, atol=0)


def test_busy_slots_fall_back_to_compact_batches_by_value(stores, monkeypatch):  # noqa: F811
    ds = _dataset(stores)
    ring = SlotRing(1, slots_per_worker=1)
    ring.busy[0] = 1  # taken (a batch still outstanding)
    collate_fn = RingCollate(ring, 4)
    samples = ds.__getitems__([0, 1, 2, 3])

    class Info:
        id = 0

    monkeypatch.setattr("torch.utils.data.get_worker_info", lambda: Info())
    (sent,) = collate_fn(samples)
    assert isinstance(sent, PackedBatch)
    fields = {name for name, *_ in sent.layout}
    assert K.NEIGHBORS in fields and K.EDGE_INDEX not in fields  # about 2 bytes per edge
    _same(sent.unpack(), collate(samples))
    ring.busy[0] = 0
    (taken,) = collate_fn(samples)
    assert isinstance(taken, SlotBatch) and int(ring.busy[0]) == 1
    _same(taken.unpack(), collate(samples))


def test_compact_batches_expand_to_the_stored_edges(stores):  # noqa: F811
    ds = _dataset(stores)
    compact = collate_arrays(ds.__getitems__([3, 0, 7]), expand=False)
    assert K.EDGE_INDEX not in compact and compact[K.NEIGHBORS].dtype == np.uint8
    expanded = {k: torch.from_numpy(v) for k, v in expand_graphs(compact).items()}
    _same(expanded, collate([ds[3], ds[0], ds[7]]))


def test_slots_of_an_abandoned_epoch_come_back(stores):  # noqa: F811
    """An epoch left after one batch leaves batches in flight, which torch discards: their
    slots are freed when the next epoch starts (those finished after that, at the start
    of the one after), and every epoch gives the right batches meanwhile."""
    ds = _dataset(stores)
    loader = make_loader(ds, batch_size=2, shuffle=False, num_workers=1, seed=0)
    first = next(iter(loader))
    assert loader.ring is not None
    again = list(loader)
    _same(again[0], first)
    third = list(loader)
    assert len(again) == len(third) == 5
    for a, b in zip(again, third, strict=True):
        _same(a, b)
    del first, again, third, a, b
    gc.collect()
    assert int(loader.ring.busy.sum()) == 0


def test_chunks_keep_the_order_and_the_last_partial_batch():
    batches = BatchSampler(SequentialSampler(range(11)), 3, False)  # 3, 3, 3, 2
    chunks = list(ChunkSampler(batches, 3))
    assert chunks == [list(range(9)), [9, 10]] and len(ChunkSampler(batches, 3)) == 2
    split = RingCollate(None, 3)
    assert [len(b) for b in split._split(list(range(11)))] == [3, 3, 3, 2]


def test_a_pinned_copy_unpacks_to_views_of_its_own_buffer(stores):  # noqa: F811
    """What the DataLoader's pinning thread makes of a slot: a copy in one buffer, whose
    tensors are views of that buffer (so a GPU copy sees pinned memory), slot freed."""
    ds = _dataset(stores)
    ring = SlotRing(1, slots_per_worker=1)
    samples = ds.__getitems__([0, 4, 8])
    place = _SlotAlloc(ring.slot(0).numpy())
    collate_arrays(samples, alloc=place)
    assert ring.acquire(0) == 0
    slot = SlotBatch(ring.id, 0, tuple(place.layout), place.used)
    copy = slot._take(pin=False)  # pin=True needs a GPU: the same path without page-locking
    assert int(ring.busy[0]) == 0
    batch = copy.unpack()
    _same(batch, collate(samples))
    assert isinstance(copy.buffer, torch.Tensor)
    base = copy.buffer.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in batch.values())
