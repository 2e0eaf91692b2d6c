"""Frames (+ graphs) of one split as a torch Dataset of numpy sample dicts, and its loader.

A sample is a frame record merged with its graph record (fields and shapes in
:mod:`forcenet.data.keys`); :func:`forcenet.data.batch.collate` joins samples into a
batch. LMDB files are opened lazily by :class:`forcenet.data.store.LmdbShard` in the
process that reads, so the dataset works with forked or spawned DataLoader workers.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from ase import Atoms
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from forcenet.data import keys as K
from forcenet.data import store
from forcenet.data.batch import Batch, collate, collate_arrays, pack_layout
from forcenet.data.frame import Frame, fixed_mask
from forcenet.data.graphs import (
    GraphSettings,
    check_compact,
    decode_graph,
    graph_record,
    read_graph_settings,
)
from forcenet.data.manifest import require_manifest
from forcenet.data.transfer import CHUNK, ChunkSampler, RingCollate, SlotRing
from forcenet.runtime import tune_malloc

Sample = dict[str, np.ndarray]


def _shard_entries(split_dir: Path, kind: str) -> list[dict[str, Any]]:
    """``[{"name", "count", "digest", ("source_digest")}]`` from the split's current manifest
    (a split without one is incomplete and refused, see :func:`require_manifest`)."""
    return list(require_manifest(split_dir, kind)["shards"])


def _check_pairing(frames_dir: Path, frames: list[dict], graphs_dir: Path, graphs: list[dict]):
    """Raise :class:`store.StoreError` unless every graph shard was built from its frame shard."""
    f_names, g_names = [e["name"] for e in frames], [e["name"] for e in graphs]
    if f_names != g_names:
        only_f = sorted(set(f_names) - set(g_names))[:5]
        only_g = sorted(set(g_names) - set(f_names))[:5]
        raise store.StoreError(
            f"frames {frames_dir} and graphs {graphs_dir} have different shards "
            f"(only in frames: {only_f}, only in graphs: {only_g}); rebuild the graphs"
        )
    for f, g in zip(frames, graphs, strict=True):
        where = f"{frames_dir / f['name']} vs {graphs_dir / g['name']}"
        if f["count"] != g["count"]:
            raise store.StoreError(f"{where}: {f['count']} frames but {g['count']} graphs")
        if f["digest"] != g["source_digest"]:
            raise store.StoreError(f"{where}: graphs were built from other frames; rebuild them")


class FrameDataset(Dataset):
    """All frames of one split folder, optionally with their neighbor lists.

    ``frames_dir``: a frame split folder (``<lmdb_root>/<split>``), with a current
    manifest (else :class:`forcenet.data.manifest.IncompleteSplitError` names the folder
    and the file). ``graphs_dir``: the matching graph split folder, likewise with a
    current manifest; its shards must pair up with the frame shards (same
    names and counts, built from the same frames) or a :class:`store.StoreError` names
    the files. ``graph_settings``: the cutoff and neighbor count those graphs were built
    with (from the graph store; None without ``graphs_dir``). Rotation augmentation is
    applied to whole batches by the training loop (:func:`forcenet.geometry.rotate_batch`),
    not here.
    """

    def __init__(self, frames_dir: Path, graphs_dir: Path | None = None) -> None:
        self.frames_dir = Path(frames_dir)
        self.graphs_dir = Path(graphs_dir) if graphs_dir is not None else None
        entries = _shard_entries(self.frames_dir, store.KIND_FRAMES)
        self.frames = [store.LmdbShard(self.frames_dir / e["name"]) for e in entries]
        self.graphs: list[store.LmdbShard] | None = None
        self.graph_settings: GraphSettings | None = None
        if self.graphs_dir is not None:
            g_entries = _shard_entries(self.graphs_dir, store.KIND_GRAPHS)
            _check_pairing(self.frames_dir, entries, self.graphs_dir, g_entries)
            self.graphs = [store.LmdbShard(self.graphs_dir / e["name"]) for e in g_entries]
            self.graph_settings = read_graph_settings(self.graphs_dir)
        counts = np.array([int(e["count"]) for e in entries], dtype=np.int64)
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # [S + 1] first global index

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, key within the shard) of global ``index``."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} frames in {self.frames_dir}")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, int(index - self.starts[shard])

    def __getitem__(self, index: int) -> Sample:
        shard, key = self.locate(int(index))
        sample = self.frames[shard].get(key)
        if self.graphs is not None:
            sample.update(self._graph(shard, key, self.graphs[shard].get(key)))
        return sample

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """The samples of a whole batch (what a DataLoader reads at once): one read
        transaction per shard touched, samples in the order of ``indices``, each graph
        left compact as stored (about 2 bytes per edge; checked, not expanded): the
        batch's collate expands it (:func:`forcenet.data.batch.expand_graphs`), after
        crossing from a worker process when there are workers."""
        located = [self.locate(int(i)) for i in indices]
        by_shard: dict[int, list[int]] = {}
        for shard, key in located:
            by_shard.setdefault(shard, []).append(key)
        found: dict[tuple[int, int], Sample] = {}
        for shard, keys in by_shard.items():
            frames = self.frames[shard].get_many(keys)
            store_ = self.graphs[shard] if self.graphs is not None else None
            graphs = store_.get_many(keys) if store_ is not None else None
            for n, key in enumerate(keys):
                sample = frames[n]
                if graphs is not None and store_ is not None:
                    where = f"{store_.path}: record {key}"
                    natoms = len(sample[K.ATOMIC_NUMBERS])
                    sample.update(check_compact(graphs[n], natoms=natoms, where=where))
                found[shard, key] = sample
        return [found[loc] for loc in located]

    def _graph(self, shard: int, key: int, record: Sample) -> Sample:
        assert self.graphs is not None
        return decode_graph(record, where=f"{self.graphs[shard].path}: record {key}")


def _init_worker(worker_id: int) -> None:
    """Seed numpy/random from this worker's torch seed, and tune it for sending batches.

    torch gives each worker ``base_seed + worker_id`` with ``base_seed`` drawn from the
    loader's seeded generator, so any randomness differs between workers and epochs yet
    is reproducible for a given seed and worker count.

    The worker's batches cross to the main process through shared-memory slots
    (:mod:`forcenet.data.transfer`).
    """
    # The GIL switch interval stays at its default: a message is a few hundred bytes (the
    # slot layout), and a 0.1 ms interval cost 10 % of the workers' throughput in handoffs.
    tune_malloc()  # keep freed batch buffers mapped (no page faults per batch)
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


#: Chunks of batches each worker prepares ahead (torch's default).
PREFETCH = 2


class BatchLoader:
    """Batches of a DataLoader as :class:`~forcenet.data.batch.Batch` dicts.

    With workers, each worker reads a whole batch (one read transaction per shard, see
    :meth:`FrameDataset.__getitems__`), collates it into a slot of shared memory and
    sends the slot's number (:mod:`forcenet.data.transfer`); this builds the batch over it.
    Without workers the batches are collated in this process. ``loader`` is the
    DataLoader underneath.
    """

    def __init__(self, loader: DataLoader, ring: SlotRing | None = None, batches: int = 0):
        self.loader = loader
        self.ring = ring  # the workers' shared-memory slots (forcenet.data.transfer)
        self.batches = batches or len(loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.ring is not None:
            # batches an abandoned epoch left in flight are discarded by torch: free their
            # slots (no worker writes for a new epoch before this iterator starts)
            self.ring.release_all()
        for item in self.loader:
            if isinstance(item, list):  # a worker's chunk of batches
                for part in item:
                    yield part.unpack()
            else:
                yield item

    def __del__(self) -> None:
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.close()

    def __len__(self) -> int:
        return self.batches


def batch_loader(
    dataset: Dataset,
    sampler: Sampler,
    *,
    batch_size: int,
    num_workers: int,
    drop_last: bool = False,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    persistent_workers: bool = False,
) -> BatchLoader:
    """A :class:`BatchLoader` over ``dataset`` in the order of ``sampler``, in batches of
    ``batch_size`` (a batch sampler, so workers read and collate whole batches).
    ``pin_memory``: page-locked batches for asynchronous copies to a GPU (use it on CUDA).
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}"
        )
    batches = BatchSampler(sampler, batch_size, drop_last)
    if num_workers == 0:
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, generator=generator)
        return BatchLoader(loader)
    ring = _slot_ring(dataset, batch_size, num_workers)
    loader = DataLoader(
        dataset,
        batch_sampler=ChunkSampler(batches, CHUNK),
        num_workers=num_workers,
        collate_fn=RingCollate(ring, batch_size),
        generator=generator,
        worker_init_fn=_init_worker,
        persistent_workers=persistent_workers,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH,
    )
    return BatchLoader(loader, ring, batches=len(batches))


def _slot_ring(dataset: Dataset, batch_size: int, workers: int) -> SlotRing | None:
    """Shared-memory slots for ``workers`` (:mod:`forcenet.data.transfer`), each twice the
    size of a batch of the first ``batch_size`` structures; None (batches then travel by
    value) when the shared memory cannot be had, e.g. a small ``/dev/shm`` in a container.
    """
    sized = cast(Sized, dataset)
    first = [dataset[i] for i in range(min(batch_size, len(sized)))]
    nbytes = pack_layout(collate_arrays(first))[1] if first else 0
    slot_bytes = max(1 << 20, 2 * nbytes)
    try:
        return SlotRing(workers, slots_per_worker=(PREFETCH + 1) * CHUNK, slot_bytes=slot_bytes)
    except (RuntimeError, OSError) as exc:
        warnings.warn(
            f"no shared memory for the loader's workers ({exc}); batches travel by value "
            "(slower): enlarge /dev/shm (docker run --shm-size)",
            stacklevel=3,
        )
        return None


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> BatchLoader:
    """Batches of ``dataset`` (:func:`batch_loader`), shuffled by a generator seeded with
    ``seed``.

    Pass ``sampler`` (e.g. a ``DistributedSampler``) instead of ``shuffle``; both at
    once is an error. Workers persist across epochs; each is seeded once from the
    loader's generator (see :func:`_init_worker`), so a run is reproducible for a given
    ``seed`` and ``num_workers``.
    """
    if sampler is not None and shuffle:
        raise ValueError("pass either shuffle=True or a sampler, not both")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if sampler is None:
        sized = cast(Sized, dataset)
        sampler = RandomSampler(sized, generator=generator) if shuffle else SequentialSampler(sized)
    return batch_loader(
        dataset,
        sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=True,  # no re-fork (seconds) at every epoch/evaluation
    )


def sample_from_atoms(atoms: Atoms | Frame, *, cutoff: float, max_neighbors: int) -> Sample:
    """A sample dict (frame fields + graph) for one structure, as the dataset would give it.

    From a :class:`Frame` the labels are included; from an ``ase.Atoms`` only the
    structure (positions, cell, pbc, numbers, tags, ``fixed`` from ``FixAtoms``), so a
    calculator never triggers a force evaluation. Positions are stored as float32 and
    the neighbor list is built from them, exactly as in the LMDB path.
    """
    if isinstance(atoms, Frame):
        record = atoms.to_record()
    elif isinstance(atoms, Atoms):
        record = {
            K.POS: np.asarray(atoms.get_positions(), dtype=np.float32),
            K.CELL: np.asarray(atoms.cell.array, dtype=np.float32),
            K.PBC: np.asarray(atoms.pbc, dtype=bool),
            K.ATOMIC_NUMBERS: np.asarray(atoms.numbers, dtype=np.int64),
            K.TAGS: np.asarray(atoms.get_tags(), dtype=np.int64),
            K.FIXED: fixed_mask(atoms),
        }
    else:
        raise TypeError(f"expected ase.Atoms or Frame, got {type(atoms).__name__}")
    record.update(graph_record(record, cutoff=cutoff, max_neighbors=max_neighbors))
    return record
