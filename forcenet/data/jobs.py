"""Running shard jobs: one output shard per input shard, skipped when already current.

Used by :func:`forcenet.data.preprocess.preprocess` (raw -> frames) and
:func:`forcenet.data.graph_build.build_graphs` (frames -> graphs): pick the split folders and
this task's shards of a job array (``shard=(i, n)``), tell whether an output was built
from exactly its input, and run the jobs in this process or in worker processes. Worker
processes die with the process that started them, even when it is killed with SIGKILL
(which runs no cleanup): otherwise they would wait for work forever
(:mod:`forcenet.data.workers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from multiprocessing import get_all_start_methods
from pathlib import Path
from typing import Any

from forcenet.data.shards import shard_number
from forcenet.data.store import StoreError, read_meta
from forcenet.data.workers import worker_pool
from forcenet.progress import ProgressLog


def is_current(out: Path, kind: str, source: dict[str, Any], extra: dict[str, Any]) -> bool:
    """True if ``out`` exists and was built from exactly this source and settings."""
    if not out.is_file():
        return False
    try:
        meta = read_meta(out)
    except StoreError:
        return False
    same = meta.get("kind") == kind and meta.get("source") == source
    return same and all(meta.get(k) == v for k, v in extra.items())


def select_shards(items: list[Path], shard: tuple[int, int] | None) -> list[tuple[int, Path]]:
    numbered = [(shard_number(p, pos), p) for pos, p in enumerate(items)]
    if shard is None:
        return numbered
    i, n = shard
    if n <= 0 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    return [(k, p) for k, p in numbered if k % n == i]


def run_jobs(
    fn: Callable[..., tuple[str, int, bool]], jobs: list[tuple], workers: int, desc: str
) -> list[tuple[str, int, bool]]:
    """Run ``fn(*job)`` for every job, in this process or in ``workers`` worker processes
    (which exit if this process dies, see :mod:`forcenet.data.workers`)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = ProgressLog(len(jobs), desc, "shard")  # a bar on a terminal, else plain lines
    results = []
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(*job))
                bar.update()
        else:
            # fork where available: spawn re-imports the caller's main module (torch, ...) in
            # every worker, seconds per start; inherited LMDB handles are reopened per pid.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with worker_pool(workers, start_method=method) as pool:
                futures = [pool.submit(fn, *job) for job in jobs]
                try:
                    for fut in as_completed(futures):
                        results.append(fut.result())
                        bar.update()
                except BaseException:
                    for fut in futures:
                        fut.cancel()  # fail fast: do not convert the remaining shards
                    raise
    finally:
        bar.close()
    return results


def split_dirs(root: Path, splits: Sequence[str] | None, has_inputs: Callable[[Path], bool]):
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: not a directory")
    if splits is None:
        found = [d for d in sorted(root.iterdir()) if d.is_dir() and has_inputs(d)]
        if not found:
            raise StoreError(f"{root}: no split folders with input shards")
        return found
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        raise StoreError(f"{root}: split folder(s) {missing} not found")
    return [root / s for s in splits]
