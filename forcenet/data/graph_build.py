"""Stage ``neighbors``: a graph store for every frame store (:func:`build_graphs`), one
graph shard per frame shard, in worker processes; each record in the compact format of
:mod:`forcenet.data.graphs`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from forcenet.data import keys as K
from forcenet.data import neighbors, store
from forcenet.data.graphs import encode_graph, graph_record
from forcenet.data.jobs import is_current, run_jobs, select_shards, split_dirs
from forcenet.data.manifest import MANIFEST, require_manifest, summarise


def _graphs(
    frames: store.LmdbShard, count: int, cutoff: float, max_neighbors: int
) -> Iterator[dict]:
    for index, record in enumerate(frames.iter_records(count)):
        try:
            graph = graph_record(record, cutoff=cutoff, max_neighbors=max_neighbors)
            yield encode_graph(
                graph[K.EDGE_INDEX], graph[K.CELL_OFFSETS], len(record[K.ATOMIC_NUMBERS])
            )
        except (neighbors.NeighborListError, ValueError) as exc:
            raise store.StoreError(f"{frames.path}: record {index}: {exc}") from exc


def _graph_shard(
    frames_path: str, out: str, cutoff: float, max_neighbors: int, split_shards: int
) -> tuple[str, int, bool]:
    """Worker job: one frame shard -> one graph shard. Returns (name, count, skipped)."""
    frames, out_path = store.LmdbShard(Path(frames_path)), Path(out)
    frames_meta = frames.meta()
    source = {
        "dir": str(frames.path.parent.resolve()),
        "name": frames.path.name,
        "digest": store.meta_digest(frames_meta),
    }
    settings = {
        "cutoff": cutoff,
        "max_neighbors": max_neighbors,
        "split_shards": split_shards,
        "graph_schema": K.GRAPH_SCHEMA_VERSION,
    }
    if is_current(out_path, store.KIND_GRAPHS, source, settings):
        return out_path.name, int(frames_meta["count"]), True
    meta = {"kind": store.KIND_GRAPHS, "source": source, **settings}
    count = int(frames_meta["count"])
    try:
        written = store.write_shard(out_path, _graphs(frames, count, cutoff, max_neighbors), meta)
    finally:
        # unmap the frames read: a job's memory stays flat however many shards it does
        store.release(frames.path)
    return out_path.name, written, False


def build_graphs(
    lmdb_root: Path,
    out_root: Path,
    *,
    cutoff: float,
    max_neighbors: int,
    splits: Sequence[str] | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Neighbor lists (``cutoff`` Å, at most ``max_neighbors`` per centre) for every frame shard.

    ``splits``: split folders of ``lmdb_root`` (default: every folder with ``.lmdb``
    shards), each refused unless its manifest is current (a preprocess run that was
    killed, failed or is an unmerged job array leaves none). ``workers``: parallel
    processes (1 = in this process). ``shard=(i, n)``: only shards with ``k % n == i``;
    the graph manifest is written once all shards exist. Shards
    already built from the same frames with the same settings are skipped. Returns, per
    split, ``{"shards", "written", "skipped", "frames", "manifest"}``.
    """
    neighbors.check_params(cutoff, max_neighbors)
    cutoff, max_neighbors = float(cutoff), int(max_neighbors)
    summary: dict[str, dict[str, Any]] = {}
    for split_dir in split_dirs(lmdb_root, splits, lambda d: bool(store.list_lmdb(d))):
        # the frame shards of a complete split only: never graphs of a partial one
        frames = require_manifest(split_dir, store.KIND_FRAMES)
        inputs = [split_dir / entry["name"] for entry in frames["shards"]]
        out_dir = Path(out_root) / split_dir.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        jobs = [
            (str(p), str(out_dir / p.name), cutoff, max_neighbors, len(inputs))
            for _, p in select_shards(inputs, shard)
        ]
        results = run_jobs(_graph_shard, jobs, workers, f"graphs {split_dir.name}")
        summary[split_dir.name] = summarise(results, out_dir, store.KIND_GRAPHS, shard)
    return summary
