"""Tiny model sizes and tiny data stores shared by the tests: fast on 2 CPU cores, yet
every code path runs."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CUTOFF = 4.5  # Å, graph radius of every fixture and every tiny model
MAX_NEIGHBORS = 50

#: Tiny constructor kwargs of every model (fast on 2 CPU cores, still every code path).
TINY_KWARGS: dict[str, dict] = {
    "forcenet": {
        "hidden_channels": 16,
        "num_interactions": 2,
        "cutoff": CUTOFF,
        "num_freqs": 8,
        "decoder_hidden_channels": 16,
    },
    "schnet": {
        "hidden_channels": 16,
        "num_filters": 16,
        "num_interactions": 2,
        "num_gaussians": 16,
        "cutoff": CUTOFF,
    },
    "dimenetpp": {
        "hidden_channels": 16,
        "out_emb_channels": 16,
        "num_blocks": 2,
        "int_emb_size": 8,
        "basis_emb_size": 4,
        "num_spherical": 3,
        "num_radial": 4,
        "cutoff": CUTOFF,
    },
    # width 32: at 16, GNS needs many more Adam steps to overfit a batch
    "gns": {"hidden_channels": 32, "num_interactions": 2, "cutoff": CUTOFF},
}


def tiny_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``TINY_KWARGS[name]`` with ``overrides`` (e.g. another ``cutoff``)."""
    return {**TINY_KWARGS[name], **overrides}


def write_stores(
    root: Path, frames: Sequence, *, cutoff: float, max_neighbors: int, split: str = "train"
) -> Path:
    """``frames`` through the real data path: ``root/raw/<split>`` (one raw shard) ->
    ``root/lmdb`` -> ``root/graphs``; returns ``root``."""
    from forcenet.data import raw
    from forcenet.data.graph_build import build_graphs
    from forcenet.data.preprocess import preprocess

    raw.write_shard(root / "raw" / split, 0, list(frames))
    preprocess(root / "raw", root / "lmdb")
    build_graphs(root / "lmdb", root / "graphs", cutoff=cutoff, max_neighbors=max_neighbors)
    return root


def save_model_checkpoint(
    path: Path, name: str, model: Any, kwargs: dict[str, Any], *, cutoff: float, max_neighbors: int
) -> None:
    """``model`` (untrained, step 0) saved as a real forcenet checkpoint with its graph."""
    from forcenet.checkpoint import save_checkpoint

    save_checkpoint(
        path,
        {
            "format_version": 1,
            "model_name": name,
            "model_kwargs": kwargs,
            "model_state": model.state_dict(),
            "step": 0,
            "epoch": 0,
            "graph": {"cutoff": cutoff, "max_neighbors": max_neighbors},
        },
    )


def fit_split(
    cfg: Any,
    name: str,
    kwargs: dict[str, Any],
    samples: Sequence,
    out: Path,
    *,
    graph: Any,
    train: int = 16,
    dev: Sequence | None = None,
    **options: Any,
) -> Path:
    """:func:`forcenet.train.fit_datasets` on ``samples[:train]``, selecting on ``dev``
    (default: the rest, ``samples[train:]``; ``[]`` for none); ``options``: the other
    keywords of ``fit_datasets`` (``resume``, ``allow_changed``, ``on_the_fly``,
    ``params_snapshot``, ``on_epoch_end``)."""
    from forcenet import train as T

    return T.fit_datasets(
        cfg,
        name,
        kwargs,
        train_set=samples[:train],
        dev_set=samples[train:] if dev is None else dev,
        out_dir=out,
        graph=graph,
        **options,
    )


@contextlib.contextmanager
def fifo_fed_once(path: Path) -> Iterator[Path]:
    """A FIFO at ``path`` whose writer closes at once if something opens it for reading:
    a reader that wrongly opens it sees an empty stream instead of blocking the test
    forever. On exit the writer is released whether or not anything read it."""
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
    writer.start()
    try:
        yield path
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a still-waiting writer open
        writer.join()
        os.close(fd)
