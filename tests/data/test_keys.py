"""The conventions of forcenet.data.keys: record fields, dtypes and shapes, and the edge
convention."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list

from forcenet.data import keys as K
from forcenet.data import manifest, store
from forcenet.data.batch import collate
from forcenet.data.dataset import FrameDataset, sample_from_atoms
from forcenet.data.frame import Frame
from forcenet.data.graph_build import build_graphs
from forcenet.geometry import edge_vectors

OC20_JSON = Path(__file__).resolve().parents[1] / "fixtures" / "oc20-slab-co-alcuse.json"

# The table in forcenet/data/keys.py, field -> (dtype, ndim or None for per-atom rank).
RECORD_TABLE = {
    K.POS: (np.float32, 2),
    K.CELL: (np.float32, 2),
    K.PBC: (np.bool_, 1),
    K.ATOMIC_NUMBERS: (np.int64, 1),
    K.TAGS: (np.int64, 1),
    K.FIXED: (np.bool_, 1),
    K.FORCES: (np.float32, 2),
    K.ENERGY: (np.float64, 0),
    K.TOTAL_ENERGY: (np.float64, 0),
    K.SID: (np.int64, 0),
    K.FID: (np.int64, 0),
    K.EDGE_INDEX: (np.int64, 2),
    K.CELL_OFFSETS: (np.int64, 2),
}


def _oc20_frame() -> Frame:
    atoms = ase.io.read(OC20_JSON)
    fixed = np.zeros(len(atoms), dtype=bool)
    fixed[atoms.constraints[0].get_indices()] = True
    # positions rounded to float32 so ASE and the store see the very same coordinates
    return Frame(
        atomic_numbers=atoms.numbers.astype(np.int64),
        pos=atoms.positions.astype(np.float32).astype(np.float64),
        cell=atoms.cell.array.astype(np.float32).astype(np.float64),
        pbc=atoms.pbc.copy(),
        tags=atoms.get_tags().astype(np.int64),
        fixed=fixed,
        forces=atoms.get_forces(apply_constraint=False),
        total_energy=float(atoms.get_potential_energy()),
        reference_energy=0.0,
        sid=7,
        fid=3,
    )


def _stored_sample(tmp_path: Path, frame: Frame, cutoff: float, max_neighbors: int) -> dict:
    """The frame written to an LMDB frame store, graphs built by the graph stage, read back."""
    frames_dir, graphs_dir = tmp_path / "lmdb" / "train", tmp_path / "graphs" / "train"
    frames_dir.mkdir(parents=True)
    source = {"dir": str(tmp_path / "nowhere"), "name": "0.extxyz.xz", "files": []}
    meta = {"kind": store.KIND_FRAMES, "source": source, "split_shards": 1}
    store.write_shard(frames_dir / "0.lmdb", [frame.to_record()], meta)
    manifest.write_manifest(frames_dir, store.KIND_FRAMES)
    build_graphs(tmp_path / "lmdb", tmp_path / "graphs", cutoff=cutoff, max_neighbors=max_neighbors)
    return FrameDataset(frames_dir, graphs_dir)[0]


def test_stored_record_fields_dtypes_and_shapes(tmp_path):
    frame = _oc20_frame()
    sample = _stored_sample(tmp_path, frame, cutoff=6.0, max_neighbors=50)
    assert tuple(sample) == K.FRAME_FIELDS + K.GRAPH_FIELDS
    for name, (dtype, ndim) in RECORD_TABLE.items():
        assert sample[name].dtype == dtype, name
        assert sample[name].ndim == ndim, name
    n, e = frame.natoms, sample[K.EDGE_INDEX].shape[1]
    assert sample[K.POS].shape == sample[K.FORCES].shape == (n, 3)
    assert sample[K.CELL].shape == (3, 3) and sample[K.CELL_OFFSETS].shape == (e, 3)
    assert sample[K.EDGE_INDEX].shape == (2, e) and 0 < e <= 50 * n
    assert sample[K.ENERGY] == frame.total_energy - frame.reference_energy
    batch = collate([sample, sample])
    assert batch[K.ENERGY].shape == (2,) and batch[K.SID].shape == (2,)  # scalars stack to [G]
    assert batch[K.CELL].shape == (2, 3, 3) and batch[K.CELL_OFFSETS].dtype == torch.float32


def test_stored_graph_edge_vectors_equal_ase_displacements(tmp_path):
    frame = _oc20_frame()
    sample = _stored_sample(tmp_path, frame, cutoff=6.0, max_neighbors=10_000)
    batch = collate([sample])
    vec = edge_vectors(
        batch[K.POS].double(),
        batch[K.CELL].double(),
        batch[K.BATCH],
        batch[K.EDGE_INDEX],
        batch[K.CELL_OFFSETS].double(),
    ).numpy()
    atoms = Atoms(numbers=frame.atomic_numbers, positions=frame.pos, cell=frame.cell, pbc=frame.pbc)
    i, j, shifts, d_vec = ase_neighbor_list("ijSD", atoms, 6.0)
    ase_vec = {(a, b, tuple(s)): v for a, b, s, v in zip(i, j, shifts, d_vec, strict=True)}
    row0, row1 = sample[K.EDGE_INDEX]
    ours = {
        (c, n, tuple(s)): v
        for n, c, s, v in zip(row0, row1, sample[K.CELL_OFFSETS], vec, strict=True)
    }
    assert ours.keys() == ase_vec.keys()  # row 1 = ASE's centre i, row 0 = neighbor j
    for key, v in ours.items():
        np.testing.assert_allclose(v, ase_vec[key], atol=1e-5)


def test_row_zero_is_the_neighbor_and_vector_points_to_it():
    atoms = Atoms("HF", positions=[[0.0, 0.0, 0.0], [0.9, 0.0, 0.0]], pbc=False)
    sample = sample_from_atoms(atoms, cutoff=2.0, max_neighbors=4)
    batch = collate([sample])
    vec = edge_vectors(
        batch[K.POS], batch[K.CELL], batch[K.BATCH], batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
    )
    for (j, i), v in zip(sample[K.EDGE_INDEX].T, vec.numpy(), strict=True):
        assert j != i
        expected = [0.9, 0.0, 0.0] if i == 0 else [-0.9, 0.0, 0.0]  # from centre i to neighbor j
        np.testing.assert_allclose(v, expected, atol=1e-6)
    assert sample[K.EDGE_INDEX].shape == (2, 2)  # both directions stored
