"""The close-pair check of frames: a cell-list search that answers as the pair-by-pair one."""

from __future__ import annotations

import numpy as np
import pytest

from forcenet.data.frame import MIN_DISTANCE, close_pair


def brute_force(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray):
    """Every pair, each at its image nearest in fractional coordinates: the reference."""
    periodic = bool(pbc.any())
    coords = np.linalg.solve(cell.T, pos.T).T if periodic else pos
    n, block = len(pos), 128
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        diff = coords[None, :] - coords[rows, None]
        if periodic:
            diff[..., pbc] -= np.round(diff[..., pbc])
            diff = diff @ cell
        d2 = np.einsum("bnk,bnk->bn", diff, diff)
        d2[np.arange(len(rows)), rows] = np.inf
        r, c = divmod(int(np.argmin(d2)), n)
        if d2[r, c] < MIN_DISTANCE**2:
            i, j = sorted((int(rows[r]), c))
            return i, j, float(np.sqrt(d2[r, c]))
    return None


CELLS = {
    "cubic": (np.eye(3) * 18.0, [True, True, True]),
    "skewed": (np.array([[16.0, 0.0, 0.0], [7.5, 14.0, 0.0], [3.0, -2.0, 30.0]]), [True] * 3),
    "slab": (
        np.array([[15.0, 0.0, 0.0], [-7.5, 13.0, 0.0], [0.0, 0.0, 40.0]]),
        [True, True, False],
    ),
    "small_cell": (np.array([[2.5, 0.0, 0.0], [1.2, 2.2, 0.0], [0.0, 0.0, 60.0]]), [True] * 3),
    "molecule": (np.zeros((3, 3)), [False, False, False]),
}


def random_structure(rng: np.random.Generator, n: int, cell: np.ndarray, pbc: list[bool]):
    """``n`` atoms spread through ``cell`` (a 25 Å box when free), some planted close pairs:
    inside the cell, and across a periodic face."""
    box = cell if np.any(pbc) else np.eye(3) * 25.0
    frac = rng.random((n, 3))
    planted = int(rng.integers(0, 4))
    for k in range(planted):
        a, b = rng.choice(n, 2, replace=False)
        frac[b] = frac[a]
        if k % 2 and pbc[0]:  # the pair straddles the face x = 0
            frac[a, 0], frac[b, 0] = 0.0005, 0.9995
    pos = frac @ box + (rng.normal(0, 0.02, (n, 3)) if planted else 0.0)
    return pos, np.asarray(cell, dtype=np.float64), np.array(pbc)


@pytest.mark.parametrize("kind", sorted(CELLS))
@pytest.mark.parametrize("n", [40, 300, 1000])
def test_close_pair_answers_as_the_pair_by_pair_check(kind: str, n: int) -> None:
    rng = np.random.default_rng([n, len(kind)])
    cell, pbc = CELLS[kind]
    found = 0
    for _ in range(12):
        pos, cell_, pbc_ = random_structure(rng, n, cell, pbc)
        want = brute_force(pos, cell_, pbc_)
        assert close_pair(pos, cell_, pbc_) == want
        found += want is not None
    assert found > 0  # close pairs were found, not only none


def test_a_crystal_without_close_pairs_passes() -> None:
    grid = np.indices((12, 12, 12)).reshape(3, -1).T * 2.5  # 1728 atoms 2.5 Å apart
    cell, pbc = np.eye(3) * 30.0, np.array([True] * 3)
    assert brute_force(grid, cell, pbc) is None and close_pair(grid, cell, pbc) is None
    moved = grid.copy()
    moved[1000] = moved[0] + [29.95, 0.0, 0.0]  # 0.05 Å from atom 0 through the face
    assert close_pair(moved, cell, pbc) == brute_force(moved, cell, pbc)
    assert close_pair(moved, cell, pbc)[:2] == (0, 1000)


def test_a_large_structure_costs_linear_work_not_all_pairs(monkeypatch) -> None:
    """5,000 atoms: squared distances are summed for candidate pairs only, not N² of them."""
    rng = np.random.default_rng(7)
    n = 5_000
    side = (n / 0.08) ** (1 / 3)  # about a metal's density
    pos = np.indices((18, 18, 18)).reshape(3, -1).T[:n] * (side / 18) + rng.normal(0, 0.1, (n, 3))
    pos[4999] = pos[4321] + [0.03, 0.0, 0.04]
    counted: list[int] = []
    einsum = np.einsum

    def counting(*args, **kwargs):
        out = einsum(*args, **kwargs)
        counted.append(int(np.size(out)))
        return out

    monkeypatch.setattr(np, "einsum", counting)
    assert close_pair(pos, np.eye(3) * side, np.array([True] * 3))[:2] == (4321, 4999)
    assert 0 < sum(counted) < 20 * n
