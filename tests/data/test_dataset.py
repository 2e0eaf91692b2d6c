"""FrameDataset, make_loader, collate offsets and frames/graphs pairing."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import fcc100
from torch.utils.data import SequentialSampler

from forcenet.data import keys as K
from forcenet.data import manifest, preprocess, raw, store
from forcenet.data.batch import collate
from forcenet.data.dataset import FrameDataset, make_loader, sample_from_atoms
from forcenet.data.frame import Frame
from forcenet.data.graph_build import build_graphs
from forcenet.data.graphs import GraphSettings
from forcenet.data.neighbors import neighbor_list
from forcenet.geometry import edge_vectors

OC20_JSON = Path(__file__).resolve().parents[1] / "fixtures" / "oc20-slab-co-alcuse.json"
CUTOFF, MAX_NEIGHBORS = 4.0, 10


def _frames(n: int, seed: int, sid: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    out = []
    for fid in range(n):
        slab = fcc100("Ni", size=(2, 2, 2 + fid % 3), vacuum=4.0)
        m = len(slab)
        out.append(
            Frame(
                atomic_numbers=slab.numbers.astype(np.int64),
                pos=slab.positions + rng.normal(0, 0.1, (m, 3)),
                cell=slab.cell.array.copy(),
                pbc=np.array([True, True, False]),
                tags=rng.integers(0, 3, m),
                fixed=rng.random(m) < 0.3,
                forces=rng.normal(0, 0.5, (m, 3)),
                total_energy=float(rng.normal(-30, 3)),
                reference_energy=-29.0,
                sid=sid,
                fid=fid,
            )
        )
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """raw -> lmdb -> graphs for splits train (shards of 5 and 4 frames) and val_id (3)."""
    root = tmp_path_factory.mktemp("stores")
    for split, sizes in {"train": [5, 4], "val_id": [3]}.items():
        for k, n in enumerate(sizes):
            raw.write_shard(root / "raw" / split, k, _frames(n, seed=k + 10 * len(split), sid=k))
    preprocess.preprocess(root / "raw", root / "lmdb")
    build_graphs(root / "lmdb", root / "graphs", cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
    return root


def _dataset(root: Path, split: str = "train") -> FrameDataset:
    return FrameDataset(root / "lmdb" / split, root / "graphs" / split)


def _batches(loader) -> list[dict]:
    return [dict(b) for b in loader]


def test_index_maps_to_shard_and_key(stores):
    ds = _dataset(stores)
    assert len(ds) == 9
    ids = [(int(ds[i][K.SID]), int(ds[i][K.FID])) for i in range(len(ds))]
    assert ids == [(0, f) for f in range(5)] + [(1, f) for f in range(4)]
    assert int(ds[-1][K.FID]) == 3 and ds.locate(6) == (1, 1)
    with pytest.raises(IndexError, match="out of range"):
        ds[9]
    sample = ds[0]
    assert set(sample) == set(K.FRAME_FIELDS + K.GRAPH_FIELDS)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    for name, value in ds[6].items():
        np.testing.assert_array_equal(clone[6][name], value)


def test_dataset_exposes_the_settings_of_its_graph_store(stores):
    assert _dataset(stores).graph_settings == GraphSettings(CUTOFF, MAX_NEIGHBORS)
    assert FrameDataset(stores / "lmdb" / "train").graph_settings is None  # frames only


def test_loader_with_0_and_2_workers_gives_identical_batches(stores):
    ds = _dataset(stores)
    kw = dict(batch_size=4, shuffle=True, seed=11)
    single = _batches(make_loader(ds, num_workers=0, **kw))
    multi = _batches(make_loader(ds, num_workers=2, **kw))
    assert len(single) == len(multi) == 3
    for a, b in zip(single, multi, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    order = [(int(s), int(f)) for b in single for s, f in zip(b[K.SID], b[K.FID], strict=True)]
    assert sorted(order) == sorted((int(ds[i][K.SID]), int(ds[i][K.FID])) for i in range(9))
    assert order != sorted(order)  # really shuffled
    other = _batches(make_loader(ds, num_workers=0, batch_size=4, shuffle=True, seed=12))
    assert not torch.equal(other[0][K.FID], single[0][K.FID]) or not torch.equal(
        other[0][K.SID], single[0][K.SID]
    )


def test_collate_offsets_edges_into_each_graphs_atoms(stores):
    ds = _dataset(stores)
    samples = [ds[i] for i in (4, 0, 7)]
    batch = collate(samples)
    starts = np.cumsum([0] + [len(s[K.ATOMIC_NUMBERS]) for s in samples])
    assert batch[K.NATOMS].tolist() == np.diff(starts).tolist()
    edge_start = 0
    for g, s in enumerate(samples):
        e = s[K.EDGE_INDEX].shape[1]
        block = batch[K.EDGE_INDEX][:, edge_start : edge_start + e].numpy()
        np.testing.assert_array_equal(block, s[K.EDGE_INDEX] + starts[g])
        assert np.all(batch[K.BATCH].numpy()[block] == g)  # edges stay inside their graph
        edge_start += e
    vec = edge_vectors(
        batch[K.POS], batch[K.CELL], batch[K.BATCH], batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
    )
    single = [collate([s]) for s in samples]
    per_graph = [
        edge_vectors(b[K.POS], b[K.CELL], b[K.BATCH], b[K.EDGE_INDEX], b[K.CELL_OFFSETS])
        for b in single
    ]
    torch.testing.assert_close(vec, torch.cat(per_graph))
    assert float(vec.norm(dim=1).max()) <= CUTOFF + 1e-5


def _hand_manifest(split_dir: Path, kind: str) -> None:
    """A manifest listing whatever shards ``split_dir`` holds, as a hand-assembled store
    would have (write_manifest refuses these incomplete or mixed folders)."""
    metas = {p.name: store.read_meta(p) for p in store.list_lmdb(split_dir)}
    shards = [
        {"name": n, "count": m["count"], "digest": store.meta_digest(m)}
        | ({"source_digest": m["source"]["digest"]} if kind == store.KIND_GRAPHS else {})
        for n, m in metas.items()
    ]
    listing = {"kind": kind, "schema_version": K.SCHEMA_VERSION, "shards": shards}
    graph_keys = {"cutoff": CUTOFF, "max_neighbors": MAX_NEIGHBORS, "graph_schema": 2}
    listing |= graph_keys if kind == "graphs" else {}
    (split_dir / manifest.MANIFEST).write_text(json.dumps(listing))


def test_graphs_of_other_frames_are_rejected(stores, tmp_path):
    with pytest.raises(store.StoreError, match="different shards"):
        FrameDataset(stores / "lmdb" / "train", stores / "graphs" / "val_id")
    # same shard names: val_id frames (3 frames) against train graphs shard 0 (5 graphs)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(stores / "graphs" / "train" / "0.lmdb", mixed / "0.lmdb")
    _hand_manifest(mixed, store.KIND_GRAPHS)
    with pytest.raises(
        store.StoreError, match=r"val_id/0\.lmdb vs .*mixed/0\.lmdb: 3 frames but 5"
    ):
        FrameDataset(stores / "lmdb" / "val_id", mixed)
    # same name and count but built from different frames
    frames = tmp_path / "frames"
    frames.mkdir()
    meta = {"kind": "frames", "source": {"dir": "x", "name": "0", "files": []}, "split_shards": 1}
    store.write_shard(frames / "0.lmdb", [f.to_record() for f in _frames(5, 99, 0)], meta)
    manifest.write_manifest(frames, store.KIND_FRAMES)
    with pytest.raises(store.StoreError, match="built from other frames"):
        FrameDataset(frames, mixed)
    with pytest.raises(store.StoreError, match="kind 'frames', expected 'graphs'"):
        FrameDataset(stores / "lmdb" / "train", stores / "lmdb" / "train")


def test_make_loader_argument_checks(stores):
    ds = _dataset(stores)
    with pytest.raises(ValueError, match="not both"):
        make_loader(
            ds, batch_size=2, shuffle=True, num_workers=0, seed=0, sampler=SequentialSampler(ds)
        )
    loader = make_loader(
        ds,
        batch_size=4,
        shuffle=False,
        num_workers=0,
        seed=0,
        sampler=SequentialSampler(ds),
        drop_last=True,
    )
    assert len(list(loader)) == 2


def test_sample_from_atoms_matches_stored_conventions():
    atoms = ase.io.read(OC20_JSON)
    sample = sample_from_atoms(atoms, cutoff=6.0, max_neighbors=50)
    assert K.FORCES not in sample and K.ENERGY not in sample  # no labels from an Atoms
    np.testing.assert_array_equal(
        np.flatnonzero(sample[K.FIXED]), atoms.constraints[0].get_indices()
    )
    np.testing.assert_array_equal(sample[K.TAGS], atoms.get_tags())
    edge_index, offsets = neighbor_list(
        atoms.positions.astype(np.float32), atoms.cell.array.astype(np.float32), atoms.pbc, 6.0, 50
    )
    np.testing.assert_array_equal(sample[K.EDGE_INDEX], edge_index)
    np.testing.assert_array_equal(sample[K.CELL_OFFSETS], offsets)
    assert sample[K.POS].dtype == np.float32
    batch = collate([sample])
    assert batch[K.POS].shape == (34, 3) and K.FORCES not in batch
    with pytest.raises(TypeError, match="ase.Atoms or Frame"):
        sample_from_atoms("not a structure", cutoff=6.0, max_neighbors=50)
