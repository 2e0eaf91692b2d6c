"""Hostile inputs fail loudly: incomplete splits, damaged records, LMDB and disk errors,
and pool workers of a killed parent."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
from test_store import _overwrite, _truncate_xz, make_frames, make_raw

from forcenet.data import codec, manifest, preprocess, raw, store
from forcenet.data import keys as K
from forcenet.data.dataset import FrameDataset
from forcenet.data.graph_build import build_graphs
from forcenet.data.graphs import GraphSettings
from forcenet.data.inspect import inspect_path
from forcenet.inputs import open_input

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # subprocesses import this checkout's code
FRAMES_META = {"kind": "frames", "source": {"dir": "x", "name": "0.extxyz.xz"}, "split_shards": 1}


def _stores(root: Path, layout: dict[str, list[int]]) -> None:
    make_raw(root / "raw", layout)
    preprocess.preprocess(root / "raw", root / "lmdb")
    build_graphs(root / "lmdb", root / "graphs", cutoff=4.0, max_neighbors=8)


# ------------------------------------------------------------------ an incomplete split is refused


def _failed_preprocess(root: Path) -> Path:
    """A first preprocess that failed on shard 1 of 2 (as a kill would leave it)."""
    make_raw(root / "raw", {"train": [3, 4]})
    _truncate_xz(root / "raw" / "train" / "1.extxyz.xz", 0.6)
    with pytest.raises(raw.RawFormatError):
        preprocess.preprocess(root / "raw", root / "lmdb")
    split = root / "lmdb" / "train"
    assert [p.name for p in split.iterdir()] == ["0.lmdb"]  # shard 0 done, no manifest
    return split


def test_every_reader_refuses_a_split_without_manifest(tmp_path):
    split = _failed_preprocess(tmp_path)
    missing = rf"{split}: no manifest\.json \({split}/manifest\.json is missing\)"
    with pytest.raises(manifest.IncompleteSplitError, match=missing + ".*forcenet preprocess"):
        build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=4.0, max_neighbors=8)
    assert not (tmp_path / "graphs" / "train" / manifest.MANIFEST).exists()
    with pytest.raises(manifest.IncompleteSplitError, match=missing):
        FrameDataset(split)  # training reads the split through FrameDataset
    with pytest.raises(manifest.IncompleteSplitError, match=missing):
        inspect_path(split)
    with pytest.raises(manifest.IncompleteSplitError, match=missing):
        inspect_path(tmp_path / "lmdb")


def test_evaluation_refuses_an_incomplete_split(tmp_path):
    _stores(tmp_path, {"val_id": [2, 2]})
    (tmp_path / "lmdb" / "val_id" / manifest.MANIFEST).unlink()
    settings = GraphSettings(cutoff=4.0, max_neighbors=8)
    with pytest.raises(manifest.IncompleteSplitError, match=r"lmdb/val_id/manifest\.json"):
        open_input(
            tmp_path / "lmdb" / "val_id",
            graphs=tmp_path / "graphs",
            settings=settings,
            batch_size=2,
        )


def test_graph_manifest_needs_a_complete_frame_split(tmp_path):
    _stores(tmp_path, {"train": [2, 2]})
    frames = tmp_path / "lmdb" / "train"
    (frames / manifest.MANIFEST).unlink()  # e.g. a preprocess rerun that was killed
    with pytest.raises(manifest.IncompleteSplitError, match=rf"{frames}/manifest\.json"):
        manifest.write_manifest(tmp_path / "graphs" / "train", "graphs")
    with pytest.raises(manifest.IncompleteSplitError, match=rf"{frames}/manifest\.json"):
        FrameDataset(frames, tmp_path / "graphs" / "train")


def test_a_manifest_that_no_longer_matches_its_shards_is_refused(tmp_path):
    _stores(tmp_path, {"train": [2, 3]})
    frames = tmp_path / "lmdb" / "train"
    (frames / "1.lmdb").unlink()
    with pytest.raises(manifest.StaleManifestError, match=r"missing: \['1\.lmdb'\]"):
        FrameDataset(frames)
    meta = {**FRAMES_META, "split_shards": 2}
    store.write_shard(frames / "1.lmdb", [f.to_record() for f in make_frames(3, seed=4)], meta)
    with pytest.raises(manifest.StaleManifestError, match=r"1\.lmdb: changed since"):
        FrameDataset(frames)


def test_job_array_split_is_refused_until_merged(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2, 3]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", shard=(0, 2))
    split = tmp_path / "lmdb" / "train"
    with pytest.raises(
        manifest.IncompleteSplitError, match=rf"job array.*run `forcenet manifest {split}`"
    ):
        FrameDataset(split)
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", shard=(1, 2))
    (split / manifest.MANIFEST).unlink()  # as if the last task had not merged
    manifest.write_manifest(split, "frames")  # `forcenet manifest SPLIT_DIR`
    assert len(FrameDataset(split)) == 5
    build_graphs(tmp_path / "lmdb", tmp_path / "g", cutoff=4.0, max_neighbors=8, shard=(0, 2))
    with pytest.raises(manifest.IncompleteSplitError, match=r"--kind graphs"):
        FrameDataset(split, tmp_path / "g" / "train")


def test_cli_prints_one_error_line_for_an_incomplete_split(tmp_path):
    split = _failed_preprocess(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "forcenet.cli", "data", "inspect", str(split)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "manifest.json is missing" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------- damaged or non-finite records


def test_damaged_record_bytes_fail_the_checksum_naming_shard_and_record(tmp_path):
    _stores(tmp_path, {"train": [3]})
    path = tmp_path / "lmdb" / "train" / "0.lmdb"
    forces = store.LmdbShard(path).get(1)[K.FORCES].astype("<f4").tobytes()
    store.release(path)
    data = bytearray(path.read_bytes())
    at = data.find(forces)
    assert at > 0 and data.find(forces, at + 1) < 0
    data[at + 8 : at + 12] = b"\xff\xff\xc0\x7f"  # a NaN written over one force component
    path.write_bytes(bytes(data))
    shard = store.LmdbShard(path)
    shard.get(0)
    with pytest.raises(store.StoreError, match=rf"{path}: record 1: checksum mismatch"):
        shard.get(1)
    dataset = FrameDataset(tmp_path / "lmdb" / "train", tmp_path / "graphs" / "train")
    with pytest.raises(store.StoreError, match=r"0\.lmdb: record 1: checksum"):
        [dataset[i] for i in range(len(dataset))]


def test_non_finite_values_are_refused_at_write(tmp_path):
    records = [f.to_record() for f in make_frames(3, seed=1, sid=7)]
    records[2][K.FORCES][1, 0] = np.nan
    path = tmp_path / "0.lmdb"
    with pytest.raises(
        store.StoreError,
        match=rf"{path}: record 2 \(input 0\.extxyz\.xz, entry 2, sid 7 fid 2\): "
        r"field 'forces': 1 non-finite",
    ):
        store.write_shard(path, records, FRAMES_META)
    assert not list(tmp_path.iterdir())
    with pytest.raises(codec.RecordEncodeError, match="'pos'"):
        codec.encode({K.POS: np.array([np.inf, 0.0])})


def _with_checksum(buf: bytes) -> bytes:
    """``buf`` (an encoded record, edited) with its checksum recomputed."""
    return buf[:8] + zlib.crc32(buf[12:]).to_bytes(4, "little") + buf[12:]


def test_non_finite_values_are_refused_at_read(tmp_path):
    path = tmp_path / "0.lmdb"
    store.write_shard(path, [f.to_record() for f in make_frames(2, seed=1)], FRAMES_META)
    good = codec.encode({K.ENERGY: np.asarray(1.5)})
    nan = _with_checksum(good.replace(np.asarray(1.5).tobytes(), np.asarray(np.nan).tobytes()))
    _overwrite(path, b"1", nan)
    with pytest.raises(store.StoreError, match=rf"{path}: record 1: field 'energy': 1 non-finite"):
        store.LmdbShard(path).get(1)


def test_a_store_of_the_previous_schema_says_rebuild(tmp_path):
    _stores(tmp_path, {"train": [2]})
    path = tmp_path / "lmdb" / "train" / "0.lmdb"
    meta = store.read_meta(path) | {"schema_version": 1}
    _overwrite(path, store.META_KEY, json.dumps(meta).encode())
    rebuild = r"rebuild the store: rerun `forcenet preprocess` and `forcenet neighbors`"
    with pytest.raises(store.StoreError, match=rf"{path}: schema version 1, .*{rebuild}"):
        FrameDataset(tmp_path / "lmdb" / "train")
    listing = tmp_path / "graphs" / "train" / manifest.MANIFEST
    listing.write_text(json.dumps(json.loads(listing.read_text()) | {"schema_version": 1}))
    with pytest.raises(store.StoreError, match=rf"{listing}: schema version 1, .*{rebuild}"):
        manifest.read_manifest(listing.parent)
    old_record = b"FNR1" + codec.encode({K.FID: np.asarray(1)})[12:]
    _overwrite(path, b"0", old_record)
    with pytest.raises(store.StoreError, match=r"record 0: record layout FNR1 .*rebuild"):
        store.LmdbShard(path).get(0)


# -------------------------------------------------------------- LMDB and disk errors name the file


def test_a_trashed_lmdb_page_names_the_file(tmp_path):
    path = tmp_path / "0.lmdb"
    store.write_shard(path, [f.to_record() for f in make_frames(3, seed=1)], FRAMES_META)
    page = os.sysconf("SC_PAGE_SIZE")
    data = bytearray(path.read_bytes())
    data[2 * page :] = b"\xab" * (len(data) - 2 * page)  # every page after the two meta pages
    path.write_bytes(bytes(data))
    with pytest.raises(store.StoreError, match=rf"{path}: LMDB error .*MDB_CORRUPTED.*damaged"):
        store.read_meta(path)


@pytest.mark.parametrize(
    "error",
    [
        lmdb.DiskError("mdb_txn_commit: No space left on device"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["lmdb", "os"],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_says_so_and_names_the_shard(tmp_path, monkeypatch, error, workers):
    make_raw(tmp_path / "raw", {"train": [2, 2]})

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(store, "_put_all", full)
    with pytest.raises(store.DiskFullError, match=r"train/\d\.lmdb: the disk is full") as info:
        preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", workers=workers)
    assert isinstance(info.value, OSError)
    assert not list((tmp_path / "lmdb" / "train").iterdir())


def test_io_error_at_commit_names_the_shard(tmp_path, monkeypatch):
    def eio(*args, **kwargs):
        raise lmdb.Error("mdb_txn_commit: Input/output error")

    monkeypatch.setattr(store, "_put_all", eio)
    path = tmp_path / "0.lmdb"
    with pytest.raises(
        store.StoreWriteError, match=rf"{path}: input/output error.*disk may be full"
    ):
        store.write_shard(path, [f.to_record() for f in make_frames(1, seed=1)], FRAMES_META)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_writing_the_manifest_names_it(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw", {"train": [2]})

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest, "write_text", full)
    with pytest.raises(store.DiskFullError, match=r"train/manifest\.json: the disk is full"):
        preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")


# ----------------------------------------------------------- pool workers die with a killed parent

_POOL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from forcenet.data.jobs import run_jobs

    def job(folder, i):
        Path(folder, f"{i}.pid").write_text(str(os.getpid()))
        time.sleep(120)
        return str(i), 0, False

    if __name__ == "__main__":
        run_jobs(job, [(sys.argv[1], i) for i in range(4)], 2, "sleep")
    """
)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_pool_workers_die_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=ENV)
    pids: list[int] = []
    try:
        pid_files = [tmp_path / "0.pid", tmp_path / "1.pid"]
        assert _wait(lambda: all(p.is_file() and p.read_text() for p in pid_files), 60)
        pids = [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in pids)
        parent.kill()  # SIGKILL: no cleanup runs in the parent
        parent.wait(10)
        assert _wait(lambda: not any(_alive(pid) for pid in pids), 5), "workers outlived parent"
    finally:
        parent.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
