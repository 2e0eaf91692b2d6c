"""LMDB shards of plain-array records: one raw shard -> one LMDB shard (no pickle).

Layout: ``<root>/<split>/<k>.lmdb`` (single file, ``subdir=False``), record keys the
ASCII integers ``"0", "1", ...`` in input order, values encoded by
:mod:`forcenet.data.codec`, plus a ``__meta__`` key holding JSON::

    {"kind": "frames" | "graphs", "schema_version": 1, "count": n,
     "source": {...identity of the input...}, "split_shards": number of inputs in the split}

A shard is written to ``<k>.lmdb.tmp`` and renamed when complete, so a crash never
leaves a file that looks finished. ``<root>/<split>/manifest.json`` lists every shard
(name, count, digest of its meta) once all of them exist; the dataset reads it to map a
global index to (shard, key) without opening every file.

Readers open files lazily, read-only and lock-free, once per process (py-lmdb refuses to
open one file twice in a process, and a forked DataLoader worker must not use its
parent's handle); reader objects pickle without the handle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from tqdm import tqdm

from forcenet.data import codec
from forcenet.data import keys as K

META_KEY = b"__meta__"
MANIFEST = "manifest.json"
KIND_FRAMES = "frames"
KIND_GRAPHS = "graphs"
SUFFIX = ".lmdb"
_INITIAL_MAP_SIZE = 64 << 20  # bytes; doubled on MapFullError
_TXN_RECORDS = 256  # records per write transaction


class StoreError(ValueError):
    """A store file that cannot be used; the message names the file (and record)."""


class MissingShardError(StoreError):
    """A split folder lacks some shards (e.g. a cluster job array still running)."""


class StaleShardError(StoreError):
    """A shard was built from an input that has changed since."""


# --------------------------------------------------------------------------- reading

_ENVS: dict[str, lmdb.Environment] = {}
_ENVS_PID = os.getpid()


def _shared_env(key: str) -> lmdb.Environment:
    """The process-wide read-only handle of file ``key`` (resolved path), opened once.

    After a fork the inherited handles belong to the parent: close them (in the child
    only) and reopen, because py-lmdb refuses a second open of the same file.
    """
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for env in _ENVS.values():
            try:
                env.close()
            except lmdb.Error:
                pass
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    env = _ENVS.get(key)
    if env is None:
        if not os.path.isfile(key):
            raise StoreError(f"{key}: no such LMDB shard")
        try:
            env = lmdb.open(
                key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False
            )
        except lmdb.Error as exc:
            raise StoreError(f"{key}: cannot open as LMDB: {exc}") from exc
        _ENVS[key] = env
    return env


def release(path: Path) -> None:
    """Close this process's read handle of ``path`` (before the file is replaced)."""
    env = _ENVS.pop(str(Path(path).resolve()), None) if _ENVS_PID == os.getpid() else None
    if env is not None:
        env.close()


class LmdbShard:
    """Read access to one shard; opens lazily in the process that reads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key = str(self.path.resolve())
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def _handle(self) -> lmdb.Environment:
        env = self._env
        # re-acquire after a fork or after release() closed the shared handle
        if env is None or self._pid != os.getpid() or _ENVS.get(self._key) is not env:
            env = self._env = _shared_env(self._key)
            self._pid = os.getpid()
        return env

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None  # an LMDB handle cannot cross processes
        state["_pid"] = -1
        return state

    def meta(self) -> dict[str, Any]:
        with self._handle().begin() as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            raise StoreError(
                f"{self.path}: no {META_KEY.decode()} key (incomplete or foreign file)"
            )
        try:
            meta = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{self.path}: corrupt {META_KEY.decode()}: {exc}") from exc
        if meta.get("schema_version") != K.SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {meta.get('schema_version')}, "
                f"this code reads {K.SCHEMA_VERSION}; rebuild the store"
            )
        return meta

    def _decode(self, index: int, raw: bytes | None) -> dict[str, np.ndarray]:
        if raw is None:
            raise StoreError(f"{self.path}: record {index} is missing")
        try:
            return codec.decode(raw)
        except codec.RecordDecodeError as exc:
            raise StoreError(f"{self.path}: record {index}: {exc}") from exc

    def get(self, index: int) -> dict[str, np.ndarray]:
        """Record ``index`` as a dict of numpy arrays."""
        with self._handle().begin(buffers=True) as txn:
            return self._decode(index, txn.get(str(index).encode()))

    def iter_records(self, count: int) -> Iterator[dict[str, np.ndarray]]:
        """Records 0 .. count-1 in order, in one read transaction."""
        with self._handle().begin(buffers=True) as txn:
            for index in range(count):
                yield self._decode(index, txn.get(str(index).encode()))


def read_meta(path: Path) -> dict[str, Any]:
    """The ``__meta__`` JSON of a shard (schema version checked)."""
    return LmdbShard(path).meta()


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a meta's canonical JSON: the shard's identity for pairing checks."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def list_lmdb(split_dir: Path) -> list[Path]:
    """Shard files of a split folder, ordered by shard number (then name)."""
    files = [p for p in Path(split_dir).glob(f"*{SUFFIX}") if p.is_file()]
    return sorted(
        files, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem)
    )


# --------------------------------------------------------------------------- writing


def _put_all(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    """Write ``items`` in one transaction, doubling the map size until they fit."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def write_shard(path: Path, records: Iterable[dict[str, np.ndarray]], meta: dict[str, Any]) -> int:
    """Write ``records`` (keys "0", "1", ...) and ``meta`` (+ "count") to ``path`` atomically.

    The file is built as ``<path>.tmp`` and renamed only after the last record and the
    meta are committed and synced; on any error the temporary file is removed and the
    exception re-raised. Returns the number of records.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    env = lmdb.open(str(tmp), subdir=False, map_size=_INITIAL_MAP_SIZE, lock=False, sync=False)
    try:
        count, pending = 0, []
        for record in records:
            pending.append((str(count).encode(), codec.encode(record)))
            count += 1
            if len(pending) >= _TXN_RECORDS:
                _put_all(env, pending)
                pending = []
        full_meta = {**meta, "count": count, "schema_version": K.SCHEMA_VERSION}
        pending.append((META_KEY, json.dumps(full_meta, sort_keys=True).encode()))
        _put_all(env, pending)
        env.sync(True)
        env.close()
        release(path)
        os.replace(tmp, path)
    except BaseException:
        env.close()
        tmp.unlink(missing_ok=True)
        raise
    return count


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: array jobs may race
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- raw -> frames


def _shard_number(path: Path, position: int) -> int:
    stem = path.name.split(".")[0]
    return int(stem) if stem.isdigit() else position


def source_identity(xyz_path: Path) -> dict[str, Any]:
    """Identity of a raw shard: name, size and mtime of its file and companions (``<k>.*``)."""
    xyz_path = Path(xyz_path)
    prefix = xyz_path.name.split(".")[0] + "."
    files = sorted(
        p for p in xyz_path.parent.iterdir() if p.name.startswith(prefix) and p.is_file()
    )
    return {
        "dir": str(xyz_path.parent.resolve()),
        "name": xyz_path.name,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


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


def _convert_raw_shard(xyz: str, out: str, split_shards: int) -> tuple[str, int, bool]:
    """Worker job: raw shard ``xyz`` -> frame LMDB ``out``. Returns (name, count, skipped)."""
    from forcenet.data import raw

    xyz_path, out_path = Path(xyz), Path(out)
    source = source_identity(xyz_path)
    if is_current(out_path, KIND_FRAMES, source, {"split_shards": split_shards}):
        return out_path.name, int(read_meta(out_path)["count"]), True
    meta = {"kind": KIND_FRAMES, "source": source, "split_shards": split_shards}
    records = (frame.to_record() for frame in raw.iter_shard(xyz_path))
    return out_path.name, write_shard(out_path, records, meta), False


def select_shards(items: list[Path], shard: tuple[int, int] | None) -> list[tuple[int, Path]]:
    numbered = [(_shard_number(p, pos), p) for pos, p in enumerate(items)]
    if shard is None:
        return numbered
    i, n = shard
    if n <= 0 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    return [(k, p) for k, p in numbered if k % n == i]


def run_jobs(
    fn: Callable[..., tuple[str, int, bool]], jobs: list[tuple], workers: int, desc: str
) -> list[tuple[str, int, bool]]:
    """Run ``fn(*job)`` for every job, in this process or in ``workers`` worker processes."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = tqdm(total=len(jobs), desc=desc, unit="shard", leave=False, disable=None)
    results = []
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(*job))
                bar.update()
        else:
            # fork where available: spawn re-imports the caller's main module (torch, ...) in
            # every worker, seconds per start; inherited LMDB handles are reopened per pid.
            ctx = get_context("fork" if "fork" in get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
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


def _has_raw_shards(split_dir: Path) -> bool:
    from forcenet.data import raw

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
    Shards whose output already matches its source are skipped. Returns, per split,
    ``{"shards", "written", "skipped", "frames", "manifest"}``.
    """
    from forcenet.data import raw

    summary: dict[str, dict[str, Any]] = {}
    for split_dir in split_dirs(raw_root, splits, _has_raw_shards):
        inputs = raw.list_shards(split_dir)
        out_dir = Path(out_root) / split_dir.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)  # invalid until every shard is current
        jobs = [
            (str(p), str(out_dir / f"{k}{SUFFIX}"), len(inputs))
            for k, p in select_shards(inputs, shard)
        ]
        results = run_jobs(_convert_raw_shard, jobs, workers, f"preprocess {split_dir.name}")
        summary[split_dir.name] = summarise(results, out_dir, KIND_FRAMES, shard)
    return summary


def summarise(results, out_dir: Path, kind: str, shard) -> dict[str, Any]:
    """Per-split summary of run_jobs results; writes the manifest once the split is complete."""
    for name, _, _ in results:
        release(out_dir / name)  # a worker may have replaced a file this process had open
    manifest = None
    try:
        manifest = write_manifest(out_dir, kind)
    except MissingShardError:
        if shard is None:
            raise
    return {
        "shards": len(results),
        "written": sum(not skipped for _, _, skipped in results),
        "skipped": sum(skipped for _, _, skipped in results),
        "frames": sum(count for _, count, _ in results),
        "manifest": manifest is not None,
    }


# --------------------------------------------------------------------------- manifests


def _expected_names(meta: dict[str, Any], kind: str) -> list[str] | None:
    """Output names the split should have, from the inputs still on disk (None if gone)."""
    src_dir = Path(meta["source"]["dir"])
    if not src_dir.is_dir():
        return None
    if kind == KIND_GRAPHS:
        return [p.name for p in list_lmdb(src_dir)]
    from forcenet.data import raw

    inputs = raw.list_shards(src_dir)
    return [f"{_shard_number(p, pos)}{SUFFIX}" for pos, p in enumerate(inputs)]


def _check_current(path: Path, meta: dict[str, Any], kind: str) -> None:
    """Raise :class:`StaleShardError` if the input of ``path`` changed since it was built."""
    src = meta["source"]
    if kind == KIND_FRAMES:
        xyz = Path(src["dir"]) / src["name"]
        if xyz.is_file() and source_identity(xyz) != src:
            raise StaleShardError(f"{path}: source {xyz} changed since the shard was built")
        return
    frames = Path(src["dir"]) / src["name"]
    if frames.is_file() and meta_digest(read_meta(frames)) != src["digest"]:
        raise StaleShardError(f"{path}: frame shard {frames} changed since the graphs were built")


def _check_complete(split_dir: Path, names: list[str], meta: dict[str, Any], kind: str) -> None:
    """Every input of the split has its shard, and no shard lacks an input."""
    expected = _expected_names(meta, kind)
    missing = sorted(set(expected) - set(names)) if expected is not None else []
    extra = sorted(set(names) - set(expected)) if expected is not None else []
    if extra:
        raise StaleShardError(f"{split_dir}: shards {extra[:10]} have no input any more")
    wanted = meta["split_shards"]
    if missing or len(names) < wanted:
        shown = missing[:10] or [f"{wanted - len(names)} shard(s)"]
        raise MissingShardError(f"{split_dir}: missing {kind} shards {shown}")


def write_manifest(split_dir: Path, kind: str) -> dict[str, Any]:
    """Scan the shard metas of ``split_dir`` and write ``manifest.json`` atomically.

    The "merge" step after a cluster job array: raises :class:`MissingShardError` if a
    shard of the split is absent, :class:`StaleShardError` if one no longer matches its
    input, :class:`StoreError` for a foreign kind, schema or mixed graph settings.
    """
    split_dir = Path(split_dir)
    paths = list_lmdb(split_dir)
    if not paths:
        raise MissingShardError(f"{split_dir}: no {SUFFIX} shards")
    metas = [read_meta(p) for p in paths]
    for path, meta in zip(paths, metas, strict=True):
        if meta.get("kind") != kind:
            raise StoreError(f"{path}: kind {meta.get('kind')!r}, expected {kind!r}")
        _check_current(path, meta, kind)
    names = [p.name for p in paths]
    _check_complete(split_dir, names, metas[0], kind)
    manifest: dict[str, Any] = {
        "kind": kind,
        "schema_version": K.SCHEMA_VERSION,
        "source_dir": metas[0]["source"]["dir"],
        "total": sum(int(m["count"]) for m in metas),
        "shards": [
            {"name": n, "count": int(m["count"]), "digest": meta_digest(m)}
            | ({"source_digest": m["source"]["digest"]} if kind == KIND_GRAPHS else {})
            for n, m in zip(names, metas, strict=True)
        ],
    }
    if kind == KIND_GRAPHS:
        settings = {(m["cutoff"], m["max_neighbors"]) for m in metas}
        if len(settings) != 1:
            raise StoreError(
                f"{split_dir}: shards built with different (cutoff, max_neighbors) {settings}"
            )
        manifest["cutoff"], manifest["max_neighbors"] = settings.pop()
    _write_json_atomic(split_dir / MANIFEST, manifest)
    return manifest


def read_manifest(split_dir: Path) -> dict[str, Any] | None:
    """The split's manifest, or None if there is none yet."""
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: corrupt manifest: {exc}") from exc
    if manifest.get("schema_version") != K.SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {manifest.get('schema_version')}, expected {K.SCHEMA_VERSION}"
        )
    return manifest
