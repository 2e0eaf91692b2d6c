"""neighbor_list (vesin) against ASE's independent neighbor list, plus truncation rules."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list

from forcenet.data.neighbors import NeighborListError, neighbor_list

OC20_JSON = Path(__file__).resolve().parents[1] / "fixtures" / "oc20-slab-co-alcuse.json"
ALL = 10**6  # max_neighbors large enough to keep every pair


def _ours(atoms: Atoms, cutoff: float, max_neighbors: int = ALL) -> list[tuple]:
    """Our edges as (centre i, neighbor j, shift) triples, in output order."""
    edge_index, offsets = neighbor_list(
        atoms.positions, atoms.cell.array, atoms.pbc, cutoff, max_neighbors
    )
    assert edge_index.dtype == np.int64 and offsets.dtype == np.int64
    assert edge_index.shape == (2, len(offsets))
    return [
        (int(i), int(j), tuple(int(s) for s in n))
        for j, i, n in zip(*edge_index, offsets, strict=True)
    ]


def _ase(atoms: Atoms, cutoff: float) -> tuple[list[tuple], np.ndarray]:
    """ASE's edges as (i, j, shift) triples and their distances (zero-distance pairs dropped)."""
    i, j, shifts, d = ase_neighbor_list("ijSd", atoms, cutoff)
    keep = d > 1e-8
    triples = [
        (int(a), int(b), tuple(int(s) for s in n))
        for a, b, n in zip(i[keep], j[keep], shifts[keep], strict=True)
    ]
    return triples, d[keep]


def _assert_same_as_ase(atoms: Atoms, cutoff: float) -> None:
    ours = _ours(atoms, cutoff)
    ref, _ = _ase(atoms, cutoff)
    assert len(ours) == len(set(ours)), "duplicate edges"
    assert set(ours) == set(ref)
    assert len(ours) > 0


def _random_atoms(seed: int, cell: np.ndarray, n: int, pbc=True) -> Atoms:
    rng = np.random.default_rng(seed)
    frac = rng.random((n, 3))
    return Atoms(numbers=rng.integers(1, 80, n), scaled_positions=frac, cell=cell, pbc=pbc)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cells_match_ase(seed):
    rng = np.random.default_rng(100 + seed)
    cell = np.diag(rng.uniform(4.0, 7.0, 3)) + rng.uniform(-1.5, 1.5, (3, 3))
    _assert_same_as_ase(_random_atoms(seed, cell, 10), cutoff=4.5)


def test_small_cell_many_image_shells_match_ase():
    # cell vectors (1.9-2.3 Å) far shorter than the cutoff: several repeats in each direction
    cell = np.array([[2.0, 0.0, 0.0], [0.3, 2.3, 0.0], [0.2, -0.4, 1.9]])
    atoms = _random_atoms(3, cell, 2)
    _assert_same_as_ase(atoms, cutoff=5.0)
    # an atom sees its own periodic images
    assert any(i == j for i, j, _ in _ours(atoms, 5.0))


def test_strongly_skewed_triclinic_cell_matches_ase():
    cell = np.array([[4.0, 0.0, 0.0], [3.6, 2.5, 0.0], [3.1, 2.2, 2.8]])  # near-degenerate angles
    _assert_same_as_ase(_random_atoms(4, cell, 6), cutoff=6.0)


def test_real_oc20_structure_matches_ase():
    atoms = ase.io.read(OC20_JSON)
    assert len(atoms) == 34 and abs(atoms.cell.array[1, 2]) > 0  # skewed cell
    _assert_same_as_ase(atoms, cutoff=6.0)


def test_molecule_without_pbc_matches_ase():
    rng = np.random.default_rng(5)
    atoms = Atoms(numbers=[6] * 12, positions=rng.uniform(0, 5, (12, 3)), pbc=False)
    _assert_same_as_ase(atoms, cutoff=3.0)
    assert all(n == (0, 0, 0) for _, _, n in _ours(atoms, 3.0))


@pytest.mark.parametrize("pbc", [(True, True, False), (True, False, True), (False, False, True)])
def test_mixed_pbc_matches_ase(pbc):
    cell = np.array([[3.0, 0.0, 0.0], [1.2, 3.1, 0.0], [0.4, 0.3, 3.3]])
    atoms = _random_atoms(6, cell, 5, pbc=pbc)
    _assert_same_as_ase(atoms, cutoff=5.0)
    shifts = np.array([n for _, _, n in _ours(atoms, 5.0)])
    assert np.all(shifts[:, ~np.array(pbc)] == 0)  # no images along open directions


def _expected_truncation(atoms: Atoms, cutoff: float, k: int) -> list[tuple]:
    """The documented rule: per centre, sort by (distance to 1e-8 Å, j, shift); keep k."""
    ref, d = _ase(atoms, cutoff)
    order = sorted(range(len(ref)), key=lambda e: (ref[e][0], round(d[e], 8), ref[e][1], ref[e][2]))
    kept, per_centre = [], {}
    for e in order:
        i = ref[e][0]
        if per_centre.get(i, 0) < k:
            kept.append(ref[e])
            per_centre[i] = per_centre.get(i, 0) + 1
    return kept


def test_truncation_keeps_the_nearest_in_documented_order():
    atoms = ase.io.read(OC20_JSON)
    ours = _ours(atoms, 6.0, max_neighbors=12)
    assert ours == _expected_truncation(atoms, 6.0, 12)
    ref, d = _ase(atoms, 6.0)
    full = np.bincount([i for i, _, _ in ref], minlength=len(atoms))
    kept_per_centre = np.bincount([i for i, _, _ in ours], minlength=len(atoms))
    np.testing.assert_array_equal(kept_per_centre, np.minimum(full, 12))
    assert (full > 12).sum() > 30  # the cut is really exercised
    # every dropped neighbor is at least as far as every kept one, per centre
    dist = dict(zip(ref, d, strict=True))
    kept = set(ours)
    for i in np.flatnonzero(full > 12):
        far_kept = max(dist[e] for e in kept if e[0] == i)
        near_dropped = min(dist[e] for e in ref if e[0] == i and e not in kept)
        assert far_kept <= near_dropped + 1e-8


def test_truncation_tie_rule_on_equal_distances():
    # simple cubic, one atom: 6 neighbors all at exactly 3 Å; keep 3 by (j, shift) order
    atoms = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 3.0, pbc=True)
    ours = _ours(atoms, 3.1, max_neighbors=3)
    assert ours == [(0, 0, (-1, 0, 0)), (0, 0, (0, -1, 0)), (0, 0, (0, 0, -1))]
    assert len(_ours(atoms, 3.1)) == 6


def test_large_structure_takes_the_lexsort_and_keeps_the_rule():
    # above 8,192 atoms the packed sort key does not fit 64 bits: the general path must
    # give the same edges in the same documented order, ties included (exact lattice)
    m, a = 21, 2.3
    grid = np.indices((m, m, m)).reshape(3, -1).T * a
    atoms = Atoms(numbers=np.full(m**3, 29), positions=grid, cell=np.eye(3) * m * a, pbc=True)
    assert len(atoms) > 8192
    ours = _ours(atoms, 2.4, max_neighbors=4)  # 6 neighbors at exactly a: ties decide
    assert ours == _expected_truncation(atoms, 2.4, 4)
    shifted = atoms.copy()
    shifted.positions += np.random.default_rng(0).normal(0.0, 0.05, (len(atoms), 3))
    assert _ours(shifted, 3.5, max_neighbors=8) == _expected_truncation(shifted, 3.5, 8)


def test_fewer_neighbors_than_max_keeps_all():
    atoms = ase.io.read(OC20_JSON)
    assert set(_ours(atoms, 3.0, max_neighbors=50)) == set(_ase(atoms, 3.0)[0])


@pytest.mark.parametrize("cutoff", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_cutoff_rejected(cutoff):
    with pytest.raises(NeighborListError, match="cutoff"):
        neighbor_list(np.zeros((2, 3)), np.eye(3) * 5, [True] * 3, cutoff, 10)


@pytest.mark.parametrize("max_neighbors", [0, -5, 2.5])
def test_bad_max_neighbors_rejected(max_neighbors):
    with pytest.raises(NeighborListError, match="max_neighbors"):
        neighbor_list(np.zeros((2, 3)), np.eye(3) * 5, [True] * 3, 3.0, max_neighbors)


@pytest.mark.parametrize(
    ("pos", "pbc", "distance"),
    [
        ([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [True] * 3, "0"),  # duplicate
        ([[0.02, 1.0, 1.0], [3.0, 1.0, 1.0], [4.98, 1.0, 1.0]], [True] * 3, "0.04"),  # image
        ([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0], [1.0, 1.05, 1.0]], [False] * 3, "0.05"),  # molecule
    ],
)
def test_atoms_closer_than_minimum_distance_rejected(pos, pbc, distance):
    """Atoms closer than the minimum distance (a duplicate position included) are refused,
    naming both atoms and the distance (the callers add the file and record)."""
    with pytest.raises(
        NeighborListError, match=rf"atoms 0 and 2 are {distance} Å apart.*minimum distance 0\.1 Å"
    ):
        neighbor_list(np.array(pos), np.eye(3) * 5, pbc, 3.0, 10)


def test_atom_own_periodic_image_is_kept_and_self_pair_dropped():
    edge_index, offsets = neighbor_list(np.zeros((1, 3)), np.eye(3) * 2.5, [True] * 3, 3.0, 50)
    assert edge_index.shape[1] == 6 and (edge_index == 0).all()  # the 6 images at 2.5 Å
    assert not (offsets == 0).all(axis=1).any()


@pytest.mark.parametrize(
    ("pos", "cell", "pbc", "message"),
    [
        (
            [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]],
            [[np.nan, 0, 0], [0, 5, 0], [0, 0, 5]],
            [True] * 3,
            "cell contains NaN",
        ),
        (
            [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]],
            [[5, 0, 0], [0, np.inf, 0], [0, 0, 5]],
            [True, True, False],
            "cell contains NaN or inf",
        ),
        (
            [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]],
            [[np.nan, 0, 0], [0, 5, 0], [0, 0, 5]],
            [False] * 3,
            "cell contains NaN",
        ),
        (
            [[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]],
            np.eye(3) * 5,
            [True] * 3,
            r"positions contain NaN or inf \(atom 1\)",
        ),
        (
            [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]],
            [[5, 0, 0], [0, 5, 0], [0, 0, 1e-2]],
            [True] * 3,
            "degenerate: 0.01 Å wide along cell vector 2",
        ),
    ],
)
def test_non_finite_or_degenerate_geometry_is_refused_before_the_search(pos, cell, pbc, message):
    """A NaN, an inf or a paper-thin periodic cell is a NeighborListError naming what is
    wrong, raised before the search (where it would crash or loop over endless images)."""
    with pytest.raises(NeighborListError, match=message):
        neighbor_list(np.array(pos), np.array(cell, dtype=float), pbc, 3.0, 10)


def test_a_thin_cell_along_a_free_direction_is_accepted():
    """Only periodic directions need width: a slab's free axis may be any length."""
    cell = np.diag([5.0, 5.0, 0.05])
    pos = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]])
    edge_index, _ = neighbor_list(pos, cell, [True, True, False], 3.0, 10)
    assert edge_index.shape[1] > 0


@pytest.mark.parametrize("cutoff", [20.5, 1e6])
def test_cutoff_above_the_maximum_is_refused(cutoff):
    from forcenet.data.neighbors import MAX_CUTOFF

    assert cutoff > MAX_CUTOFF
    with pytest.raises(NeighborListError, match=rf"cutoff {cutoff} Å is above the maximum"):
        neighbor_list(np.zeros((1, 3)), np.eye(3) * 5, [True] * 3, cutoff, 10)
    neighbor_list(np.array([[0.0, 0, 0], [2.0, 0, 0]]), np.eye(3) * 5, [True] * 3, MAX_CUTOFF, 10)
