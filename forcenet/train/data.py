"""What training takes from its data: the dev slice (whole systems held out of the
training split, by ``sid``; frames when there are too few systems), the training batches
in their reproducible order (:class:`TrainBatches`) and the dev evaluation
(:class:`DevSlice`). The label normalisation is :mod:`forcenet.scaling`."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from forcenet import distributed as D
from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate
from forcenet.data.dataset import batch_loader
from forcenet.data.online import OnTheFlyGraphs
from forcenet.geometry import random_rotations, rotate_batch
from forcenet.train.config import TrainConfig
from forcenet.train.step import evaluate

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


def fingerprint(dataset: Dataset) -> dict[str, Any]:
    """What a run trains on, compared when it resumes: ``{"frames": n, "digest": hex}``.

    Frames of a store (a ``Subset`` of a :class:`~forcenet.data.dataset.FrameDataset`, as
    :func:`forcenet.train.fit` builds them): a digest of the store's shard digests (from
    its manifest) and the frames taken, read without decoding a frame. Any other dataset:
    a digest of every sample's ``sid``, ``fid`` and atomic numbers.
    """
    from forcenet.data.dataset import FrameDataset
    from forcenet.data.manifest import read_manifest

    size = dataset_size(dataset)
    digest = hashlib.blake2b(digest_size=8)
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, FrameDataset):
        manifest = read_manifest(dataset.dataset.frames_dir) or {"shards": []}
        for entry in manifest["shards"]:
            digest.update(f"{entry['name']}:{entry['digest']};".encode())
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
    else:
        for i in range(size):
            sample = dataset[i]
            keys = [int(sample.get(K.SID, -1)), int(sample.get(K.FID, -1))]
            digest.update(np.asarray(keys, dtype=np.int64).tobytes())
            digest.update(np.asarray(sample[K.ATOMIC_NUMBERS], dtype=np.int64).tobytes())
    return {"frames": size, "digest": digest.hexdigest()}


def read_sids(frames_dir: Path) -> list[int]:
    """The ``sid`` of every frame of a frame store, in dataset order (frames only, no graphs)."""
    from forcenet.data.dataset import FrameDataset

    frames = FrameDataset(frames_dir)
    return [int(frames[i][K.SID]) for i in range(len(frames))]


class TrainBatches:
    """The training batches of a run, in an order that depends only on the seed.

    Epoch ``e`` is this rank's share of a permutation seeded by (seed, e)
    (:func:`forcenet.distributed.epoch_indices`) in batches of ``cfg.batch_size`` (the
    last partial batch dropped), so that a resumed run skips exactly the batches already
    trained on. Every batch comes on the training device, with its graph built there when
    ``graphs`` is given (on-the-fly graphs, from the stored positions), and with
    ``cfg.rotation_augment`` a random rotation drawn from (seed, step, rank).
    """

    def __init__(
        self,
        dataset: Dataset,
        cfg: TrainConfig,
        info: D.DistInfo,
        graphs: OnTheFlyGraphs | None = None,
    ) -> None:
        self.dataset, self.cfg, self.info, self.graphs = dataset, cfg, info, graphs
        self.size = dataset_size(dataset)
        self.steps_per_epoch = math.ceil(self.size / info.world_size) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"training set of {self.size} frames < batch_size {cfg.batch_size}")
        self._epoch = -1
        self._batches: Iterator[Batch] | None = None

    def next(self, epoch: int, position: int, step: int) -> Batch:
        """Batch ``position`` of epoch ``epoch``, for optimizer step ``step``."""
        if self._batches is None or self._epoch != epoch:
            self._batches, self._epoch = iter(self._loader(epoch, position)), epoch
        batch = next(self._batches)
        if position + 1 == self.steps_per_epoch:  # the epoch's last batch: let it end
            if next(self._batches, None) is not None:
                raise RuntimeError(f"epoch {epoch} has more than {self.steps_per_epoch} batches")
            self._batches = None
        device = self.info.device
        if self.graphs is not None:  # edges first, from the stored (unrotated) positions
            batch = self.graphs(batch_to(batch, device))
        if self.cfg.rotation_augment:
            seed = (self.cfg.seed * 1_000_003 + step) * self.info.world_size + self.info.rank
            rotations = random_rotations(len(batch[K.NATOMS]), torch.Generator().manual_seed(seed))
            batch = rotate_batch(batch, rotations)
        return batch_to(batch, device)

    def _loader(self, epoch: int, position: int) -> Iterator[Batch]:
        indices = D.epoch_indices(
            self.size,
            epoch=epoch,
            seed=self.cfg.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )[position * self.cfg.batch_size :]
        epoch_set = Subset(self.dataset, indices)
        return iter(
            batch_loader(
                epoch_set,
                SequentialSampler(epoch_set),
                batch_size=self.cfg.batch_size,
                drop_last=True,
                num_workers=self.cfg.num_workers,
                pin_memory=self.info.device.type == "cuda",
            )
        )


class DevSlice:
    """The dev evaluation: :func:`forcenet.train.step.evaluate` over this rank's share of
    ``dataset`` (the metrics summed over ranks), or no metrics for an empty dev slice."""

    def __init__(
        self,
        dataset: Dataset,
        cfg: TrainConfig,
        info: D.DistInfo,
        graphs: OnTheFlyGraphs | None = None,
    ) -> None:
        self.size, self.device, self.graphs = dataset_size(dataset), info.device, graphs
        shard = D.shard_indices(self.size, info.rank, info.world_size)
        self.loader = DataLoader(
            Subset(dataset, shard),
            batch_size=cfg.eval_batch_size,
            collate_fn=collate,
            pin_memory=info.device.type == "cuda",  # page-locked: faster, asynchronous copies
        )

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.size:
            return {}
        return evaluate(model, self.loader, device=self.device, graphs=self.graphs)
