"""The compact graph store (graph schema 2): exact round trip, size on disk, old stores refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111

from forcenet.data import keys as K
from forcenet.data import manifest, preprocess, raw, store
from forcenet.data.dataset import FrameDataset
from forcenet.data.frame import Frame
from forcenet.data.graph_build import build_graphs
from forcenet.data.graphs import decode_graph, encode_graph
from forcenet.data.neighbors import neighbor_list


def _slab_frames(n: int, size: tuple[int, int, int], seed: int = 0) -> list[Frame]:
    """Cu(111) slabs with an O adsorbate, rattled (OC20-like: about 4 layers, 50 neighbors)."""
    rng = np.random.default_rng(seed)
    out = []
    for fid in range(n):
        slab = fcc111("Cu", size=size, vacuum=6.0)
        add_adsorbate(slab, "O", 1.6, "fcc")
        m = len(slab)
        out.append(
            Frame(
                atomic_numbers=slab.numbers.astype(np.int64),
                pos=slab.positions + rng.normal(0, 0.05, (m, 3)),
                cell=slab.cell.array.copy(),
                pbc=np.array([True, True, True]),
                tags=np.full(m, 1),
                fixed=np.zeros(m, bool),
                forces=rng.normal(0, 0.5, (m, 3)),
                total_energy=-10.0,
                reference_energy=0.0,
                sid=0,
                fid=fid,
            )
        )
    return out


def _roundtrip(pos, cell, pbc, cutoff, max_neighbors):
    edge_index, offsets = neighbor_list(pos, cell, pbc, cutoff, max_neighbors)
    record = encode_graph(edge_index, offsets, len(pos))
    back = decode_graph(record)
    np.testing.assert_array_equal(back[K.EDGE_INDEX], edge_index)
    np.testing.assert_array_equal(back[K.CELL_OFFSETS], offsets)
    assert back[K.EDGE_INDEX].dtype == np.int64 and back[K.CELL_OFFSETS].dtype == np.int64
    return record, edge_index


def test_compact_record_round_trips_exactly_with_the_smallest_types():
    frame = _slab_frames(1, (3, 3, 4))[0]
    record, edge_index = _roundtrip(frame.pos, frame.cell, frame.pbc, 6.0, 50)
    assert record[K.NEIGHBORS].dtype == np.uint8  # 37 atoms
    assert record[K.NEIGHBOR_COUNTS].dtype == np.uint8  # at most 50 per centre
    assert record[K.OFFSET_CODES].dtype == np.uint8
    nbytes = sum(v.nbytes for v in record.values())
    assert nbytes / edge_index.shape[1] < 2.1  # 1 + 1 bytes per edge, plus 1 per atom


def test_more_than_256_atoms_use_a_wider_neighbor_index():
    frame = _slab_frames(1, (9, 8, 4))[0]  # 289 atoms
    record, edge_index = _roundtrip(frame.pos, frame.cell, frame.pbc, 4.0, 20)
    assert len(frame.pos) > 256 and record[K.NEIGHBORS].dtype == np.uint16
    assert edge_index[0].max() > 255


def test_offsets_beyond_two_cells_fall_back_to_int8_triples():
    # one atom in a 1.5 Å cubic cell with a 5 Å cutoff: images 3 cells away (4.5 Å)
    record, edge_index = _roundtrip(np.zeros((1, 3)), np.eye(3) * 1.5, [True] * 3, 5.0, 500)
    assert K.OFFSET_CODES not in record and record[K.CELL_OFFSETS].dtype == np.int8
    assert np.abs(decode_graph(record)[K.CELL_OFFSETS]).max() >= 3


def test_unsorted_edges_and_broken_records_are_refused():
    edge_index = np.array([[1, 0], [1, 0]])  # centres 1, 0: not sorted
    with pytest.raises(ValueError, match="sorted by centre"):
        encode_graph(edge_index, np.zeros((2, 3), np.int64), 2)
    good = encode_graph(np.array([[1, 0], [0, 1]]), np.zeros((2, 3), np.int64), 2)
    broken = {**good, K.NEIGHBORS: good[K.NEIGHBORS][:1]}
    with pytest.raises(store.StoreError, match="1 neighbors but the counts sum to 2"):
        decode_graph(broken, where="x.lmdb: record 4")


def _build(tmp_path: Path, frames: list[Frame]) -> tuple[Path, Path]:
    raw.write_shard(tmp_path / "raw" / "train", 0, frames)
    preprocess.preprocess(tmp_path / "raw", tmp_path / "lmdb")
    build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=6.0, max_neighbors=50)
    return tmp_path / "lmdb" / "train", tmp_path / "graphs" / "train"


def test_graph_store_on_disk_is_under_8_bytes_per_edge(tmp_path):
    """OC20-sized frames (64-65 atoms, 6 Å, 50 neighbors): the whole file, LMDB pages and
    headers included, against the 43 bytes per edge of graph schema 1."""
    frames_dir, graphs_dir = _build(tmp_path, _slab_frames(40, (4, 4, 4)))
    data = FrameDataset(frames_dir, graphs_dir)
    edges = sum(data[i][K.EDGE_INDEX].shape[1] for i in range(len(data)))
    assert edges > 40 * 64 * 40  # about 50 neighbors per atom
    on_disk = sum(p.stat().st_size for p in store.list_lmdb(graphs_dir))
    assert on_disk / edges < 8.0
    for i in range(len(data)):  # what the dataset gives is the neighbor list itself
        sample = data[i]
        edge_index, offsets = neighbor_list(sample[K.POS], sample[K.CELL], sample[K.PBC], 6.0, 50)
        np.testing.assert_array_equal(sample[K.EDGE_INDEX], edge_index)
        np.testing.assert_array_equal(sample[K.CELL_OFFSETS], offsets)


def _as_schema_1(graphs_dir: Path, frames_dir: Path) -> None:
    """Rewrite a graph store as graph schema 1 wrote it: int64 records, no graph_schema."""
    data = FrameDataset(frames_dir, graphs_dir)
    path = graphs_dir / "0.lmdb"
    meta = store.read_meta(path)
    meta.pop("graph_schema")
    meta.pop("count")
    records = [{k: data[i][k] for k in K.GRAPH_FIELDS} for i in range(len(data))]
    store.release(path)
    store.write_shard(path, records, meta)
    listing = json.loads((graphs_dir / manifest.MANIFEST).read_text())
    listing.pop("graph_schema")
    listing["shards"][0]["digest"] = store.meta_digest(store.read_meta(path))
    (graphs_dir / manifest.MANIFEST).write_text(json.dumps(listing))


def test_a_schema_1_graph_store_is_refused_with_the_rebuild_command(tmp_path):
    frames_dir, graphs_dir = _build(tmp_path, _slab_frames(3, (2, 2, 3)))
    _as_schema_1(graphs_dir, frames_dir)
    with pytest.raises(store.GraphSchemaError, match=r"graph schema 1, .* `forcenet neighbors`"):
        FrameDataset(frames_dir, graphs_dir)
    with pytest.raises(store.GraphSchemaError, match=r"0\.lmdb: graph schema 1"):
        manifest.write_manifest(graphs_dir, store.KIND_GRAPHS)
    # its records alone are refused too, naming the record
    record = store.LmdbShard(graphs_dir / "0.lmdb").get(1)
    with pytest.raises(store.GraphSchemaError, match="record 1: graph schema 1"):
        decode_graph(record, where=f"{graphs_dir / '0.lmdb'}: record 1")
    # the neighbors stage does not take it for current: it rebuilds it
    again = build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=6.0, max_neighbors=50)
    assert again["train"]["written"] == 1
    assert len(FrameDataset(frames_dir, graphs_dir)) == 3
