"""The preprocess stage: raw shards ``<split>/<k>.*`` -> frame LMDB shards ``<split>/<k>.lmdb``.

One output shard per raw shard (:mod:`forcenet.data.jobs`), written by
:func:`forcenet.data.store.write_shard`; the split's manifest once every shard exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forcenet.data import raw
from forcenet.data.jobs import is_current, run_jobs, select_shards, split_dirs
from forcenet.data.manifest import MANIFEST, summarise
from forcenet.data.shards import source_identity
from forcenet.data.store import KIND_FRAMES, SUFFIX, read_meta, write_shard
from forcenet.outdir import exclusive_folder, shared_folder


def _convert_raw_shard(xyz: str, out: str, split_shards: int) -> tuple[str, int, bool]:
    """Worker job: raw shard ``xyz`` -> frame LMDB ``out``. Returns (name, count, skipped)."""
    xyz_path, out_path = Path(xyz), Path(out)
    source = source_identity(xyz_path)
    if is_current(out_path, KIND_FRAMES, source, {"split_shards": split_shards}):
        return out_path.name, int(read_meta(out_path)["count"]), True
    meta = {"kind": KIND_FRAMES, "source": source, "split_shards": split_shards}
    records = (frame.to_record() for frame in raw.iter_shard(xyz_path))
    return out_path.name, write_shard(out_path, records, meta), False


def _has_raw_shards(split_dir: Path) -> bool:
    return any(split_dir.glob(f"*{raw.XYZ_SUFFIX}"))


def preprocess(
    raw_root: Path,
    out_root: Path,
    *,
    splits: Sequence[str] | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Convert raw shards ``raw_root/<split>/<k>.*`` to ``out_root/<split>/<k>.lmdb``.

    ``splits``: split folder names (default: every folder with raw shards).
    ``workers``: processes converting shards in parallel (1 = in this process).
    ``shard=(i, n)``: only raw shards with ``k % n == i`` (one task of a job array);
    the split manifest is written only once every shard of the split exists.
    Shards whose output already matches its source are skipped. ``out_root`` is locked
    while the run writes into it (:mod:`forcenet.outdir`): a second run into it is refused
    with :class:`~forcenet.outdir.FolderLockedError`, except that the tasks of one job
    array share it. Returns, per split,
    ``{"shards", "written", "skipped", "frames", "manifest"}``.
    """
    dirs = split_dirs(raw_root, splits, _has_raw_shards)
    # one run per output at a time (the tasks of a job array write disjoint shards side by side)
    with exclusive_folder(out_root) if shard is None else shared_folder(out_root):
        return _preprocess(dirs, Path(out_root), workers, shard)


def _preprocess(
    dirs: list[Path], out_root: Path, workers: int, shard: tuple[int, int] | None
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for split_dir in dirs:
        inputs = raw.list_shards(split_dir)
        out_dir = out_root / split_dir.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)  # invalid until every shard is current
        jobs = [
            (str(p), str(out_dir / f"{k}{SUFFIX}"), len(inputs))
            for k, p in select_shards(inputs, shard)
        ]
        results = run_jobs(_convert_raw_shard, jobs, workers, f"preprocess {split_dir.name}")
        summary[split_dir.name] = summarise(results, out_dir, KIND_FRAMES, shard)
    return summary
