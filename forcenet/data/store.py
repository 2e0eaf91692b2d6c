"""LMDB shards of plain-array records: read and write one shard (no pickle).

Layout: ``<root>/<split>/<k>.lmdb`` (single file, ``subdir=False``), record keys the
ASCII integers ``"0", "1", ...`` in input order, values encoded by
:mod:`forcenet.data.codec`, plus a ``__meta__`` key holding JSON::

    {"kind": "frames" | "graphs", "schema_version": K.SCHEMA_VERSION, "count": n,
     "source": {...identity of the input...}, "split_shards": number of inputs in the split}

Every record carries a checksum and is refused if damaged or not finite, at write and at
read (:mod:`forcenet.data.codec`); errors name the file and the record. LMDB and disk
errors become :class:`StoreError` (reading) or :class:`StoreWriteError` (writing; a
full disk is :class:`DiskFullError`), naming the file, so the CLI prints one line.

A shard is written to ``<k>.lmdb.tmp`` and renamed when complete, so a crash never
leaves a file that looks finished (the fixed temporary name also lets the next run
remove what a killed one left). Building shards from their inputs is
:mod:`forcenet.data.jobs` (runner), :mod:`forcenet.data.preprocess` (raw -> frames) and
:mod:`forcenet.data.graphs`; the split's ``manifest.json`` is :mod:`forcenet.data.manifest`.

A shard shorter than its own LMDB header says (a truncated copy) is refused before it is
mapped (:func:`check_size`): reading past the end of a mapped file kills the process with
SIGBUS. Readers open files lazily, read-only and lock-free, once per process (py-lmdb
refuses to open one file twice in a process, and a forked DataLoader worker must not use its
parent's handle); reader objects pickle without the handle.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from forcenet.data import codec
from forcenet.data import keys as K

META_KEY = b"__meta__"
KIND_FRAMES = "frames"
KIND_GRAPHS = "graphs"
SUFFIX = ".lmdb"
_INITIAL_MAP_SIZE = 64 << 20  # bytes; doubled on MapFullError
_TXN_RECORDS = 256  # records per write transaction


#: How to replace a damaged or outdated shard (a rerun skips shards whose meta is current).
REBUILD_HINT = (
    "delete it and rerun `forcenet preprocess` (frames) or `forcenet neighbors` (graphs), "
    "or `dvc repro`"
)


class StoreError(ValueError):
    """A store file that cannot be used; the message names the file (and record)."""


class GraphSchemaError(StoreError):
    """A graph store or record of another graph schema version (rebuild it)."""


#: How to rebuild a graph store of another graph schema version.
REBUILD_GRAPHS = (
    "rebuild the graphs: rerun `forcenet neighbors` on the frames (or `dvc repro`); "
    "nothing is converted silently"
)


def check_graph_schema(meta: dict[str, Any], where: Path | str) -> None:
    """Raise :class:`GraphSchemaError` unless a graph shard's meta or a graph manifest is
    of graph schema :data:`~forcenet.data.keys.GRAPH_SCHEMA_VERSION` (absent: schema 1)."""
    found = int(meta.get("graph_schema", 1))
    if found != K.GRAPH_SCHEMA_VERSION:
        raise GraphSchemaError(
            f"{where}: graph schema {found}, this code reads graph schema "
            f"{K.GRAPH_SCHEMA_VERSION} (compact, about 2 bytes per edge): {REBUILD_GRAPHS}"
        )


class StoreWriteError(OSError):
    """A shard that could not be written (LMDB or disk error); the message names the file."""


class DiskFullError(StoreWriteError):
    """A shard that could not be written because the disk is full."""


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
        for stale in _ENVS.values():
            try:
                stale.close()
            except lmdb.Error:
                pass
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    env = _ENVS.get(key)
    if env is None:
        if not os.path.isfile(key):
            raise StoreError(f"{key}: no such LMDB shard")
        check_size(Path(key))
        try:
            env = lmdb.open(
                key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False
            )
        except lmdb.Error as exc:
            raise StoreError(f"{key}: cannot open as LMDB: {exc}") from exc
        _ENVS[key] = env
    return env


# The meta pages that begin an LMDB file (lmdb.h, mdb.c: MDB_page header, then MDB_meta):
# magic and version, then at byte 24 the free DB's md_pad (the page size), at 120 the
# last page in use and at 128 the transaction id. 64-bit builds, data version 1.
_META = struct.Struct("<II8x8xI92xQQ")
_META_OFFSET = 16  # the page header before the meta
_MAGIC, _DATA_VERSION = 0xBEEFC0DE, 1


def _lmdb_size(head: bytes, second: bytes) -> int | None:
    """Bytes the file needs per its newest meta page (None: not an LMDB file we know)."""
    metas = []
    for page in (head, second):
        if len(page) < _META_OFFSET + _META.size:
            continue
        magic, version, psize, last_page, txnid = _META.unpack_from(page, _META_OFFSET)
        if magic == _MAGIC and version == _DATA_VERSION:
            metas.append((txnid, (last_page + 1) * psize))
    return max(metas)[1] if metas else None


def check_size(path: Path) -> None:
    """Raise :class:`StoreError` if the file at ``path`` is shorter than its own LMDB meta
    says (a truncated copy): mapping it would crash the process with SIGBUS, without a
    message, on the first read past the end. Files that are not LMDB are left to LMDB.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(_META_OFFSET + _META.size)
        if len(head) < _META_OFFSET + _META.size:
            return  # too short to be LMDB: lmdb.open refuses it
        psize = _META.unpack_from(head, _META_OFFSET)[2]
        second = b""
        if 0 < psize <= 1 << 16:
            fh.seek(psize)
            second = fh.read(_META_OFFSET + _META.size)
    need = _lmdb_size(head, second)
    if need is not None and size < need:
        raise StoreError(
            f"{path}: truncated LMDB shard ({size} bytes, its own header needs {need}): "
            f"{REBUILD_HINT}"
        )


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

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn an LMDB error (e.g. ``MDB_CORRUPTED`` on a trashed page) into a
        :class:`StoreError` naming this file and ``what`` was being read."""
        try:
            yield
        except lmdb.Error as exc:
            raise StoreError(
                f"{self.path}: LMDB error reading {what}: {exc}; the file is damaged: "
                f"{REBUILD_HINT}"
            ) from exc

    def meta(self) -> dict[str, Any]:
        with self._reading(META_KEY.decode()), self._handle().begin() as txn:
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
                f"this code reads {K.SCHEMA_VERSION}; rebuild the store: rerun "
                "`forcenet preprocess` and `forcenet neighbors`, or `dvc repro`"
            )
        return meta

    def _decode(self, index: int, raw: bytes | memoryview | None) -> dict[str, np.ndarray]:
        if raw is None:
            raise StoreError(f"{self.path}: record {index} is missing")
        try:
            return codec.decode(raw)
        except codec.RecordChecksumError as exc:
            raise StoreError(f"{self.path}: record {index}: {exc}; {REBUILD_HINT}") from exc
        except codec.RecordDecodeError as exc:
            raise StoreError(f"{self.path}: record {index}: {exc}") from exc

    def get(self, index: int) -> dict[str, np.ndarray]:
        """Record ``index`` as a dict of numpy arrays (checksum and finiteness verified)."""
        with self._reading(f"record {index}"), self._handle().begin(buffers=True) as txn:
            raw = txn.get(str(index).encode())
            return self._decode(index, raw)

    def get_many(self, indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
        """Records ``indices`` (in that order) in one read transaction."""
        with self._reading("records"), self._handle().begin(buffers=True) as txn:
            out = []
            for index in indices:
                with self._reading(f"record {index}"):
                    raw = txn.get(str(index).encode())
                out.append(self._decode(index, raw))
            return out

    def iter_records(self, count: int) -> Iterator[dict[str, np.ndarray]]:
        """Records 0 .. count-1 in order, in one read transaction."""
        with self._reading("records"), self._handle().begin(buffers=True) as txn:
            for index in range(count):
                with self._reading(f"record {index}"):
                    raw = txn.get(str(index).encode())
                yield self._decode(index, raw)


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


def _is_disk_full(exc: BaseException) -> bool:
    return (
        isinstance(exc, lmdb.DiskError | lmdb.MapFullError)
        or getattr(exc, "errno", None) == errno.ENOSPC
        or "No space left on device" in str(exc)
    )


def _write_error(path: Path, exc: BaseException) -> StoreWriteError:
    """The error to raise for ``exc`` (LMDB or OS) while writing ``path``."""
    if _is_disk_full(exc):
        return DiskFullError(f"{path}: the disk is full (no space left on device): {exc}")
    if getattr(exc, "errno", None) == errno.EIO or "Input/output error" in str(exc):
        return StoreWriteError(
            f"{path}: input/output error while writing ({exc}); the disk may be full "
            "or failing: check its free space"
        )
    return StoreWriteError(f"{path}: cannot write: {exc}")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn LMDB and OS errors inside the block into a :class:`StoreWriteError` naming
    ``path`` (:class:`DiskFullError` when the disk is full)."""
    try:
        yield
    except StoreWriteError:
        raise
    except (lmdb.Error, OSError) as exc:
        raise _write_error(Path(path), exc) from exc


def _encode(path: Path, index: int, record: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """``record`` encoded; a non-finite value names the shard, the record and its frame."""
    try:
        return codec.encode(record)
    except codec.RecordEncodeError as exc:
        frame = f"input {meta.get('source', {}).get('name', '?')}, entry {index}"
        if K.SID in record and K.FID in record:
            frame += f", sid {int(record[K.SID])} fid {int(record[K.FID])}"
        raise StoreError(f"{path}: record {index} ({frame}): {exc}; nothing written") from exc


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
    exception re-raised (LMDB and OS errors of the writing as :class:`StoreWriteError`
    naming ``path``; a record with NaN/inf as :class:`StoreError`). Returns the number
    of records.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        tmp.unlink(missing_ok=True)
        env = lmdb.open(str(tmp), subdir=False, map_size=_INITIAL_MAP_SIZE, lock=False, sync=False)
    try:
        count, pending = 0, []
        for record in records:
            pending.append((str(count).encode(), _encode(path, count, record, meta)))
            count += 1
            if len(pending) >= _TXN_RECORDS:
                with writing(path):
                    _put_all(env, pending)
                pending = []
        full_meta = {**meta, "count": count, "schema_version": K.SCHEMA_VERSION}
        pending.append((META_KEY, json.dumps(full_meta, sort_keys=True).encode()))
        with writing(path):
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
