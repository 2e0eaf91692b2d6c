"""Direct tests of the pure geometry functions in forcenet.geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.geometry import get_distances
from ase.neighborlist import neighbor_list as ase_neighbor_list
from scipy import stats
from test_train import make_samples

from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.neighbors import neighbor_list
from forcenet.geometry import (
    cosine_envelope,
    edge_vectors,
    gradient_forces,
    random_rotation,
    random_rotations,
    rotate_batch,
    smooth_cosine_cutoff,
    triplets,
)


def _skewed_cell_atoms():
    """Two atoms in a small triclinic periodic cell: cutoffs span several images."""
    atoms = bulk("NaCl", "rocksalt", a=4.0)  # fcc primitive cell, 2 atoms, skewed
    atoms.rattle(stdev=0.1, seed=3)
    return atoms


def _edges_from_ase(atoms, cutoff):
    i, j, shifts, vec = ase_neighbor_list("ijSD", atoms, cutoff)
    edge_index = torch.as_tensor(np.stack([j, i]), dtype=torch.int64)
    return edge_index, torch.as_tensor(shifts, dtype=torch.float64), torch.as_tensor(vec)


def test_edge_vectors_match_ase_neighborlist_under_pbc():
    atoms = _skewed_cell_atoms()
    edge_index, offsets, ase_vec = _edges_from_ase(atoms, cutoff=5.0)
    pos = torch.as_tensor(atoms.positions)
    cell = torch.as_tensor(np.asarray(atoms.cell))[None]  # [1, 3, 3]
    batch = torch.zeros(len(atoms), dtype=torch.int64)
    vec = edge_vectors(pos, cell, batch, edge_index, offsets)
    assert vec.shape == (edge_index.shape[1], 3)
    torch.testing.assert_close(vec, ase_vec, rtol=0, atol=1e-10)


def test_edge_vectors_shortest_image_match_ase_mic():
    atoms = fcc111("Pt", size=(3, 3, 2), vacuum=4.0)
    atoms.rattle(stdev=0.2, seed=1)
    edge_index, offsets = neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc, 3.5, 100)
    vec = edge_vectors(
        torch.as_tensor(atoms.positions),
        torch.as_tensor(np.asarray(atoms.cell))[None],
        torch.zeros(len(atoms), dtype=torch.int64),
        torch.as_tensor(edge_index),
        torch.as_tensor(offsets),
    )
    # 3.5 Å < half the in-plane width (8.3 Å), so every edge is the minimum image.
    mic_vec, mic_dist = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    j, i = edge_index
    torch.testing.assert_close(vec, torch.as_tensor(mic_vec[i, j]), rtol=0, atol=1e-10)
    assert len(i) > 0 and np.all(mic_dist[i, j] <= 3.5 + 1e-9)


def test_edge_vectors_batched_use_each_graphs_cell():
    a, b = _skewed_cell_atoms(), bulk("Cu", "fcc", a=3.6, cubic=True)
    parts = [_edges_from_ase(x, cutoff=4.0) for x in (a, b)]
    edge_index = torch.cat([parts[0][0], parts[1][0] + len(a)], dim=1)
    offsets = torch.cat([parts[0][1], parts[1][1]])
    pos = torch.as_tensor(np.concatenate([a.positions, b.positions]))
    cell = torch.as_tensor(np.stack([a.cell[:], b.cell[:]]))
    batch = torch.as_tensor([0] * len(a) + [1] * len(b))
    vec = edge_vectors(pos, cell, batch, edge_index, offsets)
    torch.testing.assert_close(vec, torch.cat([parts[0][2], parts[1][2]]), rtol=0, atol=1e-10)


def test_gradient_forces_of_harmonic_pair_potential():
    """E = sum over pairs k/2 (r - r0)^2 has F_i = k (r - r0) u_ij, u from i to j."""
    torch.manual_seed(0)
    pos = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    k_spring, r0 = 2.5, 1.2
    i, j = torch.triu_indices(4, 4, offset=1)
    rij = pos[j] - pos[i]  # [P, 3]
    r = rij.norm(dim=-1)
    energy = (0.5 * k_spring * (r - r0) ** 2).sum()[None]  # [G=1]
    forces = gradient_forces(energy, pos, create_graph=False)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    pair = (k_spring * (r - r0) / r)[:, None] * rij  # force on i, pointing to j if stretched
    expected.index_add_(0, i, pair.detach())
    expected.index_add_(0, j, -pair.detach())
    torch.testing.assert_close(forces, expected)
    assert not forces.requires_grad


def test_gradient_forces_create_graph_allows_second_derivative():
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], dtype=torch.float64)
    pos.requires_grad_(True)
    energy = ((pos[1] - pos[0]).norm() ** 2)[None]  # E = r^2 -> F_0 = 2 (x1 - x0)
    forces = gradient_forces(energy, pos, create_graph=True)
    assert forces.requires_grad
    (hess_row,) = torch.autograd.grad(forces[0, 0], pos)
    torch.testing.assert_close(hess_row[:, 0], torch.tensor([-2.0, 2.0], dtype=torch.float64))


def test_cosine_envelope_values():
    cutoff = 6.0
    d = torch.tensor([0.0, 3.0, cutoff, 7.0], dtype=torch.float64)
    env = cosine_envelope(d, cutoff)
    torch.testing.assert_close(env[0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(env[1], torch.tensor(math.cos(math.pi / 4), dtype=torch.float64))
    assert env[2].abs() < 1e-12 and env[3] == 0.0


def test_smooth_cosine_cutoff_values():
    cutoff = 5.0
    d = torch.tensor([0.0, 2.5, cutoff, 6.0], dtype=torch.float64)
    val = smooth_cosine_cutoff(d, cutoff)
    torch.testing.assert_close(val, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    # smooth at the cutoff: the slope just below it vanishes
    d_near = torch.tensor([cutoff - 1e-4], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(smooth_cosine_cutoff(d_near, cutoff).sum(), d_near)
    assert slope.abs().item() < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rotation_is_proper_orthogonal(seed):
    gen = torch.Generator().manual_seed(seed)
    rot = random_rotation(gen)
    assert rot.shape == (3, 3) and rot.dtype == torch.float64
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.det(rot), torch.tensor(1.0, dtype=torch.float64))
    again = random_rotation(torch.Generator().manual_seed(seed))
    torch.testing.assert_close(rot, again)
    assert not torch.allclose(rot, random_rotation(torch.Generator().manual_seed(seed + 10)))


def test_random_rotation_is_the_first_of_random_rotations():
    many = random_rotations(5, torch.Generator().manual_seed(4))
    assert many.shape == (5, 3, 3) and many.dtype == torch.float64
    gen = torch.Generator().manual_seed(4)
    assert torch.equal(
        random_rotations(1, gen)[0], random_rotation(torch.Generator().manual_seed(4))
    )


def _rotated_axes(rotations: np.ndarray) -> np.ndarray:
    return rotations[:, 2, :]  # the z unit vector as a row vector: e_z @ R  -> [n, 3]


def test_rotations_are_uniform_over_so3():
    rotations = random_rotations(3000, torch.Generator().manual_seed(0)).numpy()  # [n, 3, 3]
    for r in rotations[:20]:
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
    # Haar measure: E[R] = 0 (each entry has std 1/sqrt(3): 5 sigma ~ 0.053 for n=3000)
    assert np.abs(rotations.mean(axis=0)).max() < 0.053
    # a fixed vector lands uniformly on the sphere: each coordinate ~ U(-1, 1) (Archimedes)
    v = _rotated_axes(rotations)
    for c in range(3):
        assert stats.kstest(v[:, c], stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-4
    azimuth = np.arctan2(v[:, 1], v[:, 0])
    assert stats.kstest(azimuth, stats.uniform(loc=-np.pi, scale=2 * np.pi).cdf).pvalue > 1e-4
    # the same test rejects rotations about z only (it has the power to fail)
    gen = np.random.default_rng(1)
    angles = gen.uniform(-np.pi, np.pi, 3000)
    tilted = np.stack([np.sin(angles) * 0.3, np.cos(angles) * 0.3, np.full(3000, 0.95)], axis=1)
    assert stats.kstest(tilted[:, 2], stats.uniform(loc=-1, scale=2).cdf).pvalue < 1e-4


def test_rotate_batch_rotates_geometry_and_forces_together():
    batch = collate(make_samples(n_systems=3, frames_per_system=1))
    rot = random_rotations(3, torch.Generator().manual_seed(1))
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3, dtype=torch.float64))
    out = rotate_batch(batch, rot)
    args = (K.BATCH, K.EDGE_INDEX, K.CELL_OFFSETS)
    vec = edge_vectors(batch[K.POS], batch[K.CELL], *(batch[a] for a in args))
    vec_rot = edge_vectors(out[K.POS], out[K.CELL], *(out[a] for a in args))
    per_edge = rot.float()[batch[K.BATCH][batch[K.EDGE_INDEX][1]]]
    assert torch.allclose(vec_rot, torch.einsum("ek,ekl->el", vec, per_edge), atol=1e-4)
    assert torch.allclose(out[K.FORCES].norm(dim=1), batch[K.FORCES].norm(dim=1), atol=1e-5)
    assert not torch.allclose(out[K.FORCES], batch[K.FORCES])
    assert batch[K.POS] is not out[K.POS]  # the input batch is not modified
    # one [3, 3] rotation for the whole batch = that rotation repeated per structure
    one = rotate_batch(batch, rot[0])
    same = rotate_batch(batch, rot[0].expand(3, 3, 3))
    for key in (K.POS, K.CELL, K.FORCES):
        torch.testing.assert_close(one[key], same[key])


# --- triplets --------------------------------------------------------------------------


def _brute_force_triplets(edge_index, offsets):
    """Set of (kj, ji) edge pairs sharing atom j, minus the back-edge to the same image."""
    src, dst = edge_index.tolist()
    off = offsets.tolist()
    out = set()
    for ji in range(len(src)):
        for kj in range(len(src)):
            if dst[kj] != src[ji]:
                continue
            back = src[kj] == dst[ji] and all(
                a == -b for a, b in zip(off[kj], off[ji], strict=True)
            )
            if not back:
                out.add((kj, ji))
    return out


def _graph(atoms, cutoff):
    edge_index, offsets = neighbor_list(atoms.positions, atoms.cell[:], atoms.pbc, cutoff, 1000)
    return torch.as_tensor(edge_index), torch.as_tensor(offsets)


@pytest.mark.parametrize(
    "atoms, cutoff",
    [
        (bulk("Cu", "fcc", a=3.6), 3.0),  # 1 atom: every neighbor is an image of itself
        (bulk("Cu", "fcc", a=3.6), 4.0),  # 2nd shell: i's other images are valid k
        (_skewed_cell_atoms(), 3.5),
    ],
)
def test_triplets_match_brute_force_in_small_periodic_cells(atoms, cutoff):
    edge_index, offsets = _graph(atoms, cutoff)
    trip = triplets(edge_index, offsets, len(atoms))
    pairs = list(zip(trip.idx_kj.tolist(), trip.idx_ji.tolist(), strict=True))
    assert len(pairs) == len(set(pairs))  # no duplicates
    assert set(pairs) == _brute_force_triplets(edge_index, offsets)
    src, dst = edge_index
    assert torch.equal(trip.i, dst[trip.idx_ji]) and torch.equal(trip.j, src[trip.idx_ji])
    assert torch.equal(trip.k, src[trip.idx_kj]) and torch.equal(dst[trip.idx_kj], trip.j)
    # In a 1-atom cell i == k for every triplet: atom indices alone would drop them all.
    if len(atoms) == 1:
        assert len(pairs) > 0 and bool((trip.k == trip.i).all())


def test_triplets_never_return_to_the_same_image_of_i():
    """Geometric check: the image of k reached via k->j->i is never atom i itself."""
    atoms = _skewed_cell_atoms()
    edge_index, offsets = _graph(atoms, 4.5)
    pos = torch.as_tensor(atoms.positions)
    cell = torch.as_tensor(np.asarray(atoms.cell))[None]
    vec = edge_vectors(pos, cell, torch.zeros(len(atoms), dtype=torch.int64), edge_index, offsets)
    trip = triplets(edge_index, offsets, len(atoms))
    k_rel_i = vec[trip.idx_ji] + vec[trip.idx_kj]  # x_k(image) - x_i
    assert k_rel_i.norm(dim=-1).min() > 1e-6
    # and every geometric path j -> i, k -> j with k at a distinct point is present
    n_edges_in = torch.bincount(edge_index[1], minlength=len(atoms))
    expected = int((n_edges_in[edge_index[0]] - 1).sum())  # minus exactly one back-edge
    assert trip.idx_kj.numel() == expected


def test_triplets_empty_graph():
    trip = triplets(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0, 3), num_nodes=3)
    assert all(t.numel() == 0 for t in trip)
