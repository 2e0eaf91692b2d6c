"""LMDB frame/graph stores: round trip, no pickle, corruption, interruption, sharded runs."""

from __future__ import annotations

import lzma
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111

from forcenet.data import codec, manifest, preprocess, raw, store
from forcenet.data import keys as K
from forcenet.data.frame import Frame
from forcenet.data.graph_build import build_graphs
from forcenet.data.graphs import decode_graph
from forcenet.data.neighbors import NeighborListError, neighbor_list
from forcenet.outdir import FolderLockedError


def make_frames(n: int, seed: int, sid: int = 0) -> list[Frame]:
    """Small labelled Cu(111)+O slabs of varying size (random rattles and labels)."""
    rng = np.random.default_rng(seed)
    frames = []
    for fid in range(n):
        slab = fcc111("Cu", size=(2, 2, 2 + fid % 2), vacuum=5.0)
        add_adsorbate(slab, "O", 1.6, "fcc")
        pos = slab.positions + rng.normal(0, 0.05, (len(slab), 3))
        layer = slab.get_tags()  # ase: 1 = top layer ... ; 0 = adsorbate
        tags = np.where(layer == 0, 2, np.where(layer == 1, 1, 0))
        frames.append(
            Frame(
                atomic_numbers=slab.numbers.astype(np.int64),
                pos=pos,
                cell=slab.cell.array.copy(),
                pbc=np.array([True, True, True]),
                tags=tags.astype(np.int64),
                fixed=tags == 0,
                forces=rng.normal(0, 0.3, (len(slab), 3)),
                total_energy=float(rng.normal(-50, 5)),
                reference_energy=float(rng.normal(-48, 1)),
                sid=sid,
                fid=fid,
            )
        )
    return frames


def make_raw(root: Path, layout: dict[str, list[int]]) -> dict[tuple[str, int], list[Frame]]:
    """Raw OC20-layout splits: ``{"train": [3, 2]}`` = shards 0 and 1 with 3 and 2 frames."""
    written = {}
    for split, sizes in layout.items():
        for k, n in enumerate(sizes):
            frames = make_frames(n, seed=10 * k + len(split), sid=100 * k)
            raw.write_shard(root / split, k, frames)
            written[(split, k)] = frames
    return written


def _assert_record_matches(record: dict, frame: Frame) -> None:
    expected = frame.to_record()
    assert list(record) == list(K.FRAME_FIELDS)
    for name, value in expected.items():
        assert record[name].dtype == value.dtype, name
        if value.dtype.kind == "f":
            np.testing.assert_allclose(record[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(record[name], value, err_msg=name)


def test_round_trip_layout_meta_and_manifest(tmp_path):
    frames = make_raw(tmp_path / "raw", {"train": [3, 2], "val_id": [2]})
    summary = preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    assert summary["train"] == {
        "shards": 2,
        "written": 2,
        "skipped": 0,
        "frames": 5,
        "manifest": True,
    }
    assert sorted(p.name for p in (tmp_path / "lmdb" / "train").iterdir()) == [
        "0.lmdb",
        "1.lmdb",
        "manifest.json",
    ]
    for (split, k), expected in frames.items():
        shard = store.LmdbShard(tmp_path / "lmdb" / split / f"{k}.lmdb")
        meta = shard.meta()
        assert meta["count"] == len(expected) and meta["kind"] == "frames"
        assert meta["schema_version"] == K.SCHEMA_VERSION
        assert meta["source"]["name"] == f"{k}.extxyz.xz"
        for i, frame in enumerate(expected):  # keys "0", "1", ... in input order
            _assert_record_matches(shard.get(i), frame)
        with pytest.raises(store.StoreError, match=f"{k}.lmdb: record {len(expected)} is missing"):
            shard.get(len(expected))
    listing = manifest.read_manifest(tmp_path / "lmdb" / "train")
    assert listing["total"] == 5 and [s["count"] for s in listing["shards"]] == [3, 2]


def test_rerun_skips_current_shards_and_redoes_changed_ones(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2, 2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    out0 = tmp_path / "lmdb" / "train" / "0.lmdb"
    before = out0.stat().st_mtime_ns
    again = preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    assert again["train"]["skipped"] == 2 and again["train"]["written"] == 0
    assert out0.stat().st_mtime_ns == before
    raw.write_shard(tmp_path / "raw" / "train", 1, make_frames(4, seed=9))  # changed input
    third = preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    assert third["train"] == {
        "shards": 2,
        "written": 1,
        "skipped": 1,
        "frames": 6,
        "manifest": True,
    }


def test_reading_never_unpickles(tmp_path, monkeypatch):
    frames = make_raw(tmp_path / "raw", {"train": [3]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while reading the store")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    shard = store.LmdbShard(tmp_path / "lmdb" / "train" / "0.lmdb")
    for i, frame in enumerate(frames[("train", 0)]):
        _assert_record_matches(shard.get(i), frame)


def _overwrite(path: Path, key: bytes, value: bytes) -> None:
    store.release(path)  # py-lmdb refuses a second handle on the same file
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


@pytest.mark.parametrize(
    "value",
    [b"garbage that is not a record", codec.encode({"pos": np.zeros((4, 3))})[:-7]],
    ids=["bad-magic", "truncated"],
)
def test_corrupt_value_names_file_and_key(tmp_path, value):
    make_raw(tmp_path / "raw", {"train": [3]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    path = tmp_path / "lmdb" / "train" / "0.lmdb"
    _overwrite(path, b"1", value)
    shard = store.LmdbShard(path)
    shard.get(0)
    with pytest.raises(store.StoreError, match=r"0\.lmdb: record 1: "):
        shard.get(1)


def test_corrupt_meta_is_reported(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    path = tmp_path / "lmdb" / "train" / "0.lmdb"
    _overwrite(path, store.META_KEY, b"{not json")
    with pytest.raises(store.StoreError, match=r"0\.lmdb: corrupt __meta__"):
        store.read_meta(path)


def _truncate_xz(path: Path, keep_fraction: float) -> None:
    text = lzma.decompress(path.read_bytes())
    path.write_bytes(lzma.compress(text[: int(len(text) * keep_fraction)]))


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_raw_shard_names_file_and_leaves_no_output(tmp_path, workers):
    make_raw(tmp_path / "raw", {"train": [3, 6]})
    bad = tmp_path / "raw" / "train" / "1.extxyz.xz"
    _truncate_xz(bad, 0.6)  # ends inside frame 3
    with pytest.raises(raw.RawFormatError, match=r"1\.extxyz\.xz.*frame 3"):
        preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", workers=workers)
    out = tmp_path / "lmdb" / "train"
    assert not (out / "1.lmdb").exists()
    assert not (out / manifest.MANIFEST).exists()
    assert not list(out.glob("*.tmp"))


def test_interrupted_write_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw", {"train": [2, 4]})
    out = tmp_path / "lmdb" / "train"
    out.mkdir(parents=True)
    (out / "1.lmdb.tmp").write_bytes(b"leftover of a killed run")
    real_encode, calls = codec.encode, []

    def crash_on_fifth_record(record):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of shard 1
        return real_encode(record)

    monkeypatch.setattr(codec, "encode", crash_on_fifth_record)
    with pytest.raises(KeyboardInterrupt):
        preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    assert sorted(p.name for p in out.iterdir()) == ["0.lmdb"]  # shard 0 finished, 1 gone
    monkeypatch.setattr(codec, "encode", real_encode)
    summary = preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    assert summary["train"]["skipped"] == 1 and summary["train"]["frames"] == 6


def test_sharded_runs_plus_manifest_equal_a_full_run(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2, 3, 1]})
    full = preprocess.preprocess(tmp_path / "raw", tmp_path / "full")
    first = preprocess.preprocess(tmp_path / "raw", tmp_path / "parts", shard=(0, 2))  # shards 0, 2
    assert first["train"]["shards"] == 2 and first["train"]["manifest"] is False
    assert not (tmp_path / "parts" / "train" / manifest.MANIFEST).exists()
    with pytest.raises(manifest.MissingShardError, match=r"1\.lmdb"):
        manifest.write_manifest(tmp_path / "parts" / "train", "frames")
    second = preprocess.preprocess(tmp_path / "raw", tmp_path / "parts", shard=(1, 2))
    assert second["train"]["manifest"] is True
    merged = manifest.write_manifest(tmp_path / "parts" / "train", "frames")
    assert merged == manifest.read_manifest(tmp_path / "full" / "train")
    assert full["train"]["frames"] == merged["total"] == 6
    with pytest.raises(ValueError, match="shard"):
        preprocess.preprocess(tmp_path / "raw", tmp_path / "x", shard=(2, 2))


def test_a_second_preprocess_into_the_same_output_is_refused_while_one_runs(tmp_path, monkeypatch):
    make_raw(tmp_path / "raw", {"train": [2, 3]})
    convert, refused = preprocess._convert_raw_shard, []

    def convert_while_another_run_starts(*job):
        with pytest.raises(FolderLockedError, match=r"lmdb: another run \(pid \d+\) is writing"):
            preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
        refused.append(job)
        return convert(*job)

    monkeypatch.setattr(preprocess, "_convert_raw_shard", convert_while_another_run_starts)
    summary = preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    assert len(refused) == 2 and summary["train"]["manifest"] is True
    assert manifest.require_manifest(tmp_path / "lmdb" / "train", "frames")["total"] == 5


def test_job_array_tasks_share_the_output_but_a_full_run_is_refused_meanwhile(
    tmp_path, monkeypatch
):
    make_raw(tmp_path / "raw", {"train": [2, 3]})
    convert, nested = preprocess._convert_raw_shard, []

    def convert_while_other_runs_start(*job):
        if job[1].endswith("0.lmdb"):  # inside task 0/2: task 1/2 runs beside it, a full run not
            nested.append(preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", shard=(1, 2)))
            with pytest.raises(FolderLockedError, match="another run"):
                preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
        return convert(*job)

    monkeypatch.setattr(preprocess, "_convert_raw_shard", convert_while_other_runs_start)
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", shard=(0, 2))
    assert nested[0]["train"]["written"] == 1
    assert manifest.write_manifest(tmp_path / "lmdb" / "train", "frames")["total"] == 5


@pytest.mark.parametrize(
    "command",
    [
        ["data", "inspect", "{frames}/train"],
        ["neighbors", "{frames}", "{graphs}", "--workers", "1"],
    ],
    ids=["inspect", "neighbors"],
)
def test_a_truncated_shard_is_refused_with_its_name_instead_of_a_crash(tmp_path, command):
    make_raw(tmp_path / "raw", {"train": [300]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    shard = (tmp_path / "lmdb" / "train" / "0.lmdb").resolve()
    os.truncate(shard, shard.stat().st_size // 2)  # the manifest is kept
    args = [a.format(frames=tmp_path / "lmdb", graphs=tmp_path / "graphs") for a in command]
    proc = subprocess.run(
        [sys.executable, "-m", "forcenet.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not SIGBUS (-7)
    assert f"{shard}: truncated LMDB shard" in proc.stderr
    assert "rerun `forcenet preprocess`" in proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_progress_in_a_log_is_plain_lines(tmp_path, capsys, workers):
    make_raw(tmp_path / "raw", {"train": [2, 1, 2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb", workers=workers)
    err = capsys.readouterr().err  # not a terminal, as in a log file
    assert "\r" not in err
    assert [line.split(",")[0] for line in err.splitlines()] == [
        f"preprocess train: {k}/3 shards" for k in (1, 2, 3)
    ]


def test_write_manifest_detects_stale_and_foreign_shards(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2, 2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    raw.write_shard(tmp_path / "raw" / "train", 0, make_frames(3, seed=7))
    with pytest.raises(manifest.StaleShardError, match=r"0\.lmdb: source .*0\.extxyz\.xz changed"):
        manifest.write_manifest(tmp_path / "lmdb" / "train", "frames")
    with pytest.raises(store.StoreError, match="kind 'frames', expected 'graphs'"):
        manifest.write_manifest(tmp_path / "lmdb" / "train", "graphs")
    for path in (tmp_path / "raw" / "train").glob("0.*"):
        path.unlink()  # shard 0's input is gone: its output must not enter a manifest
    with pytest.raises(manifest.StaleShardError, match=r"\['0\.lmdb'\] have no input any more"):
        manifest.write_manifest(tmp_path / "lmdb" / "train", "frames")


def test_graph_store_matches_neighbor_list_and_records_settings(tmp_path):
    make_raw(tmp_path / "raw", {"train": [3, 2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    summary = build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=4.0, max_neighbors=8)
    assert summary["train"]["frames"] == 5 and summary["train"]["manifest"]
    for k, n in ((0, 3), (1, 2)):
        frames = store.LmdbShard(tmp_path / "lmdb" / "train" / f"{k}.lmdb")
        graphs = store.LmdbShard(tmp_path / "graphs" / "train" / f"{k}.lmdb")
        meta = graphs.meta()
        assert (meta["cutoff"], meta["max_neighbors"], meta["count"]) == (4.0, 8, n)
        assert meta["source"]["digest"] == store.meta_digest(frames.meta())
        for i in range(n):
            f, record = frames.get(i), graphs.get(i)
            edge_index, offsets = neighbor_list(f[K.POS], f[K.CELL], f[K.PBC], 4.0, 8)
            # compact on disk: one byte per neighbor index, one per image offset
            assert sorted(record) == sorted([K.NEIGHBOR_COUNTS, K.NEIGHBORS, K.OFFSET_CODES])
            assert record[K.NEIGHBORS].dtype == np.uint8
            assert record[K.OFFSET_CODES].dtype == np.uint8
            g = decode_graph(record)
            assert list(g) == list(K.GRAPH_FIELDS)
            np.testing.assert_array_equal(g[K.EDGE_INDEX], edge_index)
            np.testing.assert_array_equal(g[K.CELL_OFFSETS], offsets)
            assert g[K.EDGE_INDEX].shape[1] > 0
    listing = manifest.read_manifest(tmp_path / "graphs" / "train")
    assert (listing["kind"], listing["cutoff"], listing["max_neighbors"]) == ("graphs", 4.0, 8)
    assert listing["graph_schema"] == K.GRAPH_SCHEMA_VERSION
    again = build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=4.0, max_neighbors=8)
    assert again["train"]["skipped"] == 2
    other = build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=3.0, max_neighbors=8)
    assert other["train"]["written"] == 2  # changed settings rebuild


def test_graph_shards_in_parts_and_bad_params(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2, 2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    part = build_graphs(
        tmp_path / "lmdb", tmp_path / "g", cutoff=4.0, max_neighbors=6, shard=(1, 2)
    )
    assert part["train"]["manifest"] is False
    build_graphs(tmp_path / "lmdb", tmp_path / "g", cutoff=4.0, max_neighbors=6, shard=(0, 2))
    assert manifest.write_manifest(tmp_path / "g" / "train", "graphs")["total"] == 4
    with pytest.raises(NeighborListError, match="cutoff"):
        build_graphs(tmp_path / "lmdb", tmp_path / "g", cutoff=0.0, max_neighbors=6)
    with pytest.raises(NeighborListError, match="max_neighbors"):
        build_graphs(tmp_path / "lmdb", tmp_path / "g", cutoff=4.0, max_neighbors=-1)
    # frames rebuilt from a changed raw shard: the old graphs are stale
    raw.write_shard(tmp_path / "raw" / "train", 1, make_frames(2, seed=5))
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    with pytest.raises(manifest.StaleShardError, match=r"1\.lmdb: frame shard"):
        manifest.write_manifest(tmp_path / "g" / "train", "graphs")


def test_reader_pickles_without_handle_and_reopens_after_fork(tmp_path):
    make_raw(tmp_path / "raw", {"train": [2]})
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    shard = store.LmdbShard(tmp_path / "lmdb" / "train" / "0.lmdb")
    first = shard.get(0)  # the parent holds an open handle
    clone = pickle.loads(pickle.dumps(shard))
    assert clone._env is None
    np.testing.assert_array_equal(clone.get(0)[K.POS], first[K.POS])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen rather than reuse or fail on the parent's handle
        ok = np.array_equal(shard.get(1)[K.FID], np.asarray(1))
        os.write(write_end, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    assert shard.get(1)[K.FID] == 1  # parent handle still fine


def test_inspect_raw_lmdb_and_graphs_agree_with_the_frames(tmp_path):
    from forcenet.data.inspect import format_summary, inspect_path

    written = make_raw(tmp_path / "raw", {"train": [3, 2], "val_id": [2]})
    frames = written[("train", 0)] + written[("train", 1)]
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=4.0, max_neighbors=8)
    natoms = [f.natoms for f in frames]
    free = np.concatenate([~f.fixed for f in frames])
    norms = np.concatenate([np.linalg.norm(f.forces, axis=1) for f in frames])[free]
    z = np.concatenate([f.atomic_numbers for f in frames])
    summaries = {
        "raw_root": inspect_path(tmp_path / "raw")["splits"]["train"],
        "raw_split": inspect_path(tmp_path / "raw" / "train")["splits"]["train"],
        "lmdb_root": inspect_path(tmp_path / "lmdb")["splits"]["train"],
        "graphs": inspect_path(tmp_path / "graphs" / "train")["splits"]["train"],
    }
    assert set(inspect_path(tmp_path / "lmdb")["splits"]) == {"train", "val_id"}
    for where, s in summaries.items():
        assert s["frames"] == 5, where
        assert s["atoms_per_frame"] == {
            "min": min(natoms),
            "mean": np.mean(natoms),
            "max": max(natoms),
        }
        assert s["elements"] == {"Cu": int((z == 29).sum()), "O": int((z == 8).sum())}
        assert s["tags"] == {
            t: int(c)
            for t, c in zip(
                *np.unique(np.concatenate([f.tags for f in frames]), return_counts=True),
                strict=True,
            )
        }
        assert s["fixed_fraction"] == pytest.approx(1 - free.mean())
        assert s["force_free_mean_abs"] == pytest.approx(norms.mean(), rel=1e-5)
        assert s["force_free_max_abs"] == pytest.approx(norms.max(), rel=1e-5)
        assert s["energy_min"] == pytest.approx(min(f.energy for f in frames), abs=1e-6)
    assert summaries["raw_split"]["kind"] == "raw" and summaries["graphs"]["kind"] == "graphs"
    assert "edges_per_atom" not in summaries["lmdb_root"]
    edges = sum(
        store.LmdbShard(p).get(i)[K.NEIGHBORS].shape[0]
        for p, n in (
            (tmp_path / "graphs" / "train" / "0.lmdb", 3),
            (tmp_path / "graphs" / "train" / "1.lmdb", 2),
        )
        for i in range(n)
    )
    assert summaries["graphs"]["edges_per_atom"]["mean"] == pytest.approx(edges / sum(natoms))
    with_graphs = inspect_path(tmp_path / "lmdb", graphs=tmp_path / "graphs")["splits"]["val_id"]
    assert with_graphs["edges_per_atom"]["mean"] > 0
    text = format_summary(inspect_path(tmp_path / "graphs"))
    assert "train (graphs): 5 frames" in text and "edges/atom" in text and "Cu" in text
    assert inspect_path(tmp_path / "lmdb", max_frames=2)["splits"]["train"]["frames"] == 2
    with pytest.raises(ValueError, match="neither"):
        inspect_path(tmp_path)
