"""Throughput of the data path: generate -> preprocess -> neighbor lists -> DataLoader.

Writes ``reports/benchmarks/data.json`` (and prints it). Everything runs in a temporary
folder and takes about a minute on 2 CPU cores:

* ``generate``: frames/s of :func:`forcenet.data.generate.generate_emt` (EMT labels);
* ``preprocess``: frames/s of raw ``.extxyz.xz`` shards -> LMDB frame shards;
* ``neighbors``: frames/s of :func:`build_graphs` (LMDB read + neighbor list + LMDB
  write), of our ``neighbor_list`` alone in memory, and of plain vesin on the same
  frames (no truncation, no sorting) — the cost of our rules on top of the library;
* ``loader``: graphs/s through ``make_loader`` (batch 16) with 0 and 2 workers, one
  epoch including worker start-up.

Usage: ``python benchmarks/bench_data.py [--systems 8] [--copies 12] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import vesin

from forcenet.data import keys as K
from forcenet.data import preprocess, raw
from forcenet.data.dataset import FrameDataset, make_loader
from forcenet.data.generate import generate_emt
from forcenet.data.graphs import build_graphs
from forcenet.data.neighbors import neighbor_list

CUTOFF, MAX_NEIGHBORS, BATCH_SIZE = 6.0, 50, 16  # the ForceNet / OC20 graph settings


def _rate(count: int, seconds: float) -> dict[str, float]:
    return {"items": count, "seconds": round(seconds, 3), "per_second": round(count / seconds, 1)}


def bench_generate(raw_root: Path, systems: int) -> dict:
    start = time.perf_counter()
    report = generate_emt(raw_root, seed=0, n_systems={K.TRAIN: systems}, workers=2)
    out = _rate(int(report["frames"]), time.perf_counter() - start)
    out["mean_atoms"] = report["splits"][K.TRAIN]["mean_atoms"]
    return out


def replicate_shards(raw_root: Path, copies: int) -> int:
    """Copy the generated train shards ``copies`` times (new shard numbers): more frames to time."""
    split = raw_root / K.TRAIN
    frames = [f for path in raw.list_shards(split) for f in raw.iter_shard(path)]
    for path in raw.list_shards(split):
        path.unlink()
        raw.sidecar_path(path).unlink()
    for k in range(copies):
        raw.write_shard(split, k, frames)
    return len(frames) * copies


def bench_preprocess(raw_root: Path, lmdb_root: Path, frames: int, workers: int) -> dict:
    start = time.perf_counter()
    summary = preprocess.preprocess(raw_root, lmdb_root, workers=workers)
    assert summary[K.TRAIN]["frames"] == frames
    return {**_rate(frames, time.perf_counter() - start), "workers": workers}


def bench_neighbors(lmdb_root: Path, graphs_root: Path) -> dict:
    start = time.perf_counter()
    summary = build_graphs(lmdb_root, graphs_root, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    frames = summary[K.TRAIN]["frames"]
    stage = _rate(frames, time.perf_counter() - start)
    records = [r for r in FrameDataset(lmdb_root / K.TRAIN)]
    start = time.perf_counter()
    edges = sum(
        neighbor_list(r[K.POS], r[K.CELL], r[K.PBC], CUTOFF, MAX_NEIGHBORS)[0].shape[1]
        for r in records
    )
    ours = _rate(len(records), time.perf_counter() - start)
    calc = vesin.NeighborList(cutoff=CUTOFF, full_list=True)
    start = time.perf_counter()
    pairs = 0
    for r in records:
        i, _, _, _ = calc.compute(
            points=r[K.POS].astype(np.float64),
            box=r[K.CELL].astype(np.float64),
            periodic=[bool(p) for p in r[K.PBC]],
            quantities="ijSd",
        )
        pairs += len(i)
    plain = _rate(len(records), time.perf_counter() - start)
    return {
        "build_graphs": stage,
        "neighbor_list_in_memory": ours,
        "vesin_plain": plain,
        "edges_per_frame_truncated": round(edges / len(records), 1),
        "pairs_per_frame_untruncated": round(pairs / len(records), 1),
    }


def bench_loader(lmdb_root: Path, graphs_root: Path, workers: int) -> dict:
    dataset = FrameDataset(lmdb_root / K.TRAIN, graphs_root / K.TRAIN)
    loader = make_loader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, seed=0)
    start = time.perf_counter()
    graphs = sum(int(batch[K.NATOMS].numel()) for batch in loader)
    return {**_rate(graphs, time.perf_counter() - start), "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=8, help="EMT systems to generate")
    parser.add_argument("--copies", type=int, default=12, help="replicas of the generated shard")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/data.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "vesin": vesin.__version__,
            },
            "settings": {
                "cutoff": CUTOFF,
                "max_neighbors": MAX_NEIGHBORS,
                "batch_size": BATCH_SIZE,
            },
            "generate": bench_generate(root / "raw", args.systems),
        }
        frames = replicate_shards(root / "raw", args.copies)
        result["preprocess"] = bench_preprocess(root / "raw", root / "lmdb", frames, workers=1)
        result["preprocess_2_workers"] = bench_preprocess(
            root / "raw", root / "lmdb2", frames, workers=2
        )
        result["neighbors"] = bench_neighbors(root / "lmdb", root / "graphs")
        result["loader"] = {
            f"{w}_workers": bench_loader(root / "lmdb", root / "graphs", w) for w in (0, 2)
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
