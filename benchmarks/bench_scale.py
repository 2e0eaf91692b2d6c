"""Scale rehearsal: the data path of an OC20-sized run on this machine.

Builds an OC20-sized synthetic training split (default 200,000 frames of 60-90 atoms,
made from generated EMT frames by :mod:`synthetic`, in the raw OC20 layout), then runs
what a cluster job array would, each step as 2 processes with ``--shard i/2`` and a
``manifest`` merge:

1. ``acquire``: write the raw ``.extxyz.xz`` shards (``benchmarks/synthetic.py``);
2. ``preprocess``: ``forcenet preprocess --shard i/2`` + ``forcenet manifest``;
3. ``neighbors``: ``forcenet neighbors --shard i/2`` (6 Å, 50 neighbors) +
   ``forcenet manifest --kind graphs``;
4. ``epoch``: one training epoch's data path, training skipped: every batch of 16 of a
   shuffled ``make_loader`` with 2 workers, as the training loop gets it.

Each step records its wall time, frames/s and the peak resident memory of each of its
processes (``ru_maxrss`` of the finished child, and sampled: anonymous memory apart from the
file pages of the mapped LMDB stores, which the kernel reclaims). Disk per frame and per
edge is measured on the stores. The same rehearsal first runs at a tenth of the size: peak
memory that stays flat from one to the other is memory that does not grow with the number of
frames (streamed, not loaded whole). A reader's mapped file pages do grow with the store it
reads (page cache, not held memory): both are recorded. Results in
``reports/benchmarks/scale.json``; the data are deleted afterwards (``--keep`` keeps them).

    .venv/bin/python benchmarks/bench_scale.py                     # 20k, then 200k frames
    .venv/bin/python benchmarks/bench_scale.py --frames 20000 --small 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
CUTOFF, MAX_NEIGHBORS, BATCH, SHARD_SIZE = 6.0, 50, 16, 5000


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a loader's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident KiB of ``pid`` and its descendants, summed."""
    anon = file_ = 0
    for p in _tree(pid):
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
            )
            anon += int(fields["RssAnon"].split()[0])
            file_ += int(fields["RssFile"].split()[0])
        except (OSError, KeyError, ValueError):
            pass
    return anon, file_


def _run_parallel(commands: list[list[str]], log: Path) -> dict:
    """Run ``commands`` at once: their wall time, each one's peak RSS (MiB, ``ru_maxrss``:
    the largest of the process and its children) and the peak anonymous and file-backed
    resident memory of its process tree (workers included), sampled every 0.1 s. File
    pages are the LMDB files mapped for reading: page cache the kernel takes back when
    it needs it, not memory the processes hold."""
    start = time.perf_counter()
    with log.open("a") as out:
        procs = [subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT) for c in commands]
        anon = [0] * len(procs)
        file_ = [0] * len(procs)
        peaks = [0.0] * len(procs)
        running = set(range(len(procs)))
        while running:
            for k in sorted(running):
                a, f = _memory(procs[k].pid)
                anon[k], file_[k] = max(anon[k], a), max(file_[k], f)
                pid, status, usage = os.wait4(procs[k].pid, os.WNOHANG)
                if pid == 0:
                    continue
                running.discard(k)
                if os.waitstatus_to_exitcode(status) != 0:
                    raise RuntimeError(f"{' '.join(commands[k])} failed; see {log}")
                peaks[k] = round(usage.ru_maxrss / 1024, 1)  # KiB -> MiB
            time.sleep(0.1)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": peaks,
        "peak_anon_mib": [round(a / 1024, 1) for a in anon],
        "peak_file_mib": [round(f / 1024, 1) for f in file_],
    }


def _forcenet(*args: str) -> list[str]:
    return [PYTHON, "-m", "forcenet.cli", *args]


def _disk(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def rehearse(frames: int, root: Path, pool: Path, log: Path) -> dict:
    raw_dir, lmdb, graphs = root / "raw" / "train", root / "lmdb", root / "graphs"
    halves = ("0/2", "1/2")
    steps: dict[str, dict] = {}
    print(f"bench_scale: {frames} frames in {root}", flush=True)
    steps["acquire"] = _run_parallel(
        [
            [PYTHON, str(HERE / "synthetic.py"), str(pool), str(raw_dir), "--frames", str(frames)]
            + ["--shard-size", str(SHARD_SIZE), "--shard", h]
            for h in halves
        ],
        log,
    )
    steps["preprocess"] = _run_parallel(
        [
            _forcenet("preprocess", str(root / "raw"), str(lmdb), "--workers", "1", "--shard", h)
            for h in halves
        ],
        log,
    )
    steps["preprocess"]["manifest"] = _run_parallel(
        [_forcenet("manifest", str(lmdb / "train"))], log
    )
    steps["neighbors"] = _run_parallel(
        [
            _forcenet("neighbors", str(lmdb), str(graphs), "--workers", "1", "--shard", h)
            + ["--cutoff", str(CUTOFF), "--max-neighbors", str(MAX_NEIGHBORS)]
            for h in halves
        ],
        log,
    )
    steps["neighbors"]["manifest"] = _run_parallel(
        [_forcenet("manifest", str(graphs / "train"), "--kind", "graphs")], log
    )
    epoch_json = root / "epoch.json"
    steps["epoch"] = _run_parallel(
        [
            [
                PYTHON,
                str(HERE / "bench_scale.py"),
                "--epoch",
                str(lmdb),
                str(graphs),
                str(epoch_json),
            ]
        ],
        log,
    )
    epoch = json.loads(epoch_json.read_text())
    for name in ("acquire", "preprocess", "neighbors"):
        steps[name]["frames_per_s"] = round(frames / steps[name]["seconds"], 1)
    steps["epoch"].update(epoch)
    raw_bytes = _disk(raw_dir, "*.xz")
    frame_bytes, graph_bytes = _disk(lmdb / "train", "*.lmdb"), _disk(graphs / "train", "*.lmdb")
    return {
        "frames": frames,
        "mean_atoms": epoch["mean_atoms"],
        "edges_per_frame": round(epoch["edges"] / frames, 1),
        "steps": steps,
        "disk": {
            "raw_bytes_per_frame": round(raw_bytes / frames, 1),
            "frame_store_bytes_per_frame": round(frame_bytes / frames, 1),
            "graph_store_bytes_per_frame": round(graph_bytes / frames, 1),
            "graph_store_bytes_per_edge": round(graph_bytes / epoch["edges"], 3),
            "total_gb": round((raw_bytes + frame_bytes + graph_bytes) / 1e9, 3),
        },
        "wall_s": round(sum(s["seconds"] for s in steps.values()), 1),
    }


def epoch_pass(lmdb: Path, graphs: Path, out: Path) -> None:
    """One shuffled pass of batches of 16 with 2 workers (the training loop's data)."""
    from forcenet.data import keys as K
    from forcenet.data.dataset import FrameDataset, make_loader

    dataset = FrameDataset(lmdb / "train", graphs / "train")
    loader = make_loader(dataset, batch_size=BATCH, shuffle=True, num_workers=2, seed=0)
    start = time.perf_counter()
    structures = atoms = edges = 0
    for batch in loader:
        structures += int(batch[K.NATOMS].numel())
        atoms += int(batch[K.NATOMS].sum())
        edges += int(batch[K.EDGE_INDEX].shape[1])
    seconds = time.perf_counter() - start
    result = {
        "structures": structures,
        "graphs_per_s": round(structures / seconds, 1),
        "loader_seconds": round(seconds, 2),
        "mean_atoms": round(atoms / structures, 1),
        "edges": edges,
    }
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=20_000, help="the first, smaller run")
    parser.add_argument("--systems", type=int, default=24, help="generated EMT systems (pool)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/forcenet_scale"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/scale.json"))
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    parser.add_argument("--epoch", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch:
        epoch_pass(*args.epoch)
        return
    from forcenet.emt.generate import generate_emt

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    log = args.workdir / "log.txt"
    try:
        start = time.perf_counter()
        generate_emt(args.workdir / "pool", seed=0, n_systems={"train": args.systems}, workers=2)
        pool_s = time.perf_counter() - start
        runs = {}
        for frames in (args.small, args.frames):
            runs[str(frames)] = rehearse(
                frames, args.workdir / str(frames), args.workdir / "pool" / "train", log
            )
            shutil.rmtree(args.workdir / str(frames))  # disk for the next run
        small, big = runs[str(args.small)], runs[str(args.frames)]

        def growth(key: str) -> dict[str, float]:
            return {
                name: round(max(big["steps"][name][key]) / max(small["steps"][name][key]), 3)
                for name in ("acquire", "preprocess", "neighbors", "epoch")
            }

        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "settings": {
                "cutoff": CUTOFF,
                "max_neighbors": MAX_NEIGHBORS,
                "batch_size": BATCH,
                "raw_shard_frames": SHARD_SIZE,
                "processes_per_step": 2,
                "pool_systems": args.systems,
                "pool_seconds": round(pool_s, 1),
            },
            "runs": runs,
            "peak_rss_ratio_big_to_small": growth("peak_rss_mib"),
            "peak_anon_ratio_big_to_small": growth("peak_anon_mib"),
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from forcenet.atomic import write_text

    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
