"""Periodic neighbor lists with vesin, truncated to the nearest ``max_neighbors``.

Rules (tested against ASE's neighbor list in ``tests/data/test_neighbors.py``):

* Pairs (i, j, image n) with ``0 < |pos[j] + n @ cell - pos[i]| <= cutoff``; all
  periodic images along every periodic direction are found, however many cell
  repeats the cutoff spans (small and skewed cells included). Self-pairs at zero
  distance are dropped; an atom's own periodic images are kept.
* Two distinct atoms (or an atom and another's periodic image) closer than
  :data:`forcenet.data.frame.MIN_DISTANCE` (0.1 Å) are refused with a
  :class:`NeighborListError` naming both atoms (duplicate positions would otherwise be
  a zero-length edge, dropped silently); callers add the file and record.
* Non-periodic directions (``pbc`` False) get no images; ``pbc`` all False is a
  molecule in free space.
* Truncation: for each centre i, edges are sorted by distance and the first
  ``max_neighbors`` kept. **Tie rule**: equal distances (to 1e-8 Å) are ordered by
  neighbor index j, then by image offset (lexicographic); this is deterministic, so
  the same input always gives the same graph.
* Output follows :mod:`forcenet.data.keys`: ``edge_index`` [2, E] (row 0 neighbor j,
  row 1 centre i), ``cell_offsets`` [E, 3] int64, sorted by centre i then distance.
"""

from __future__ import annotations

import numpy as np
import vesin

from forcenet.data.frame import MIN_DISTANCE


class NeighborListError(ValueError):
    """Invalid neighbor-list parameters or structure."""


def check_params(cutoff: float, max_neighbors: int) -> None:
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise NeighborListError(f"cutoff must be a positive number of Å, got {cutoff}")
    if int(max_neighbors) != max_neighbors or max_neighbors <= 0:
        raise NeighborListError(f"max_neighbors must be a positive integer, got {max_neighbors}")


def neighbor_list(
    pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, max_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """Edges of one structure: ``edge_index`` [2, E] int64, ``cell_offsets`` [E, 3] int64."""
    check_params(cutoff, max_neighbors)
    pos = np.asarray(pos, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    if len(pos) == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int64)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-9:
        raise NeighborListError("periodic cell has zero volume")
    box = cell if pbc.any() else np.zeros((3, 3))
    calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts, dist = calc.compute(
        points=pos, box=box, periodic=[bool(p) for p in pbc], quantities="ijSd"
    )
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 3)
    self_pair = (i == j) & ~shifts.any(axis=1)
    close = (dist < MIN_DISTANCE) & ~self_pair
    if close.any():
        k = int(np.argmax(close))
        a, b = sorted((int(i[k]), int(j[k])))
        raise NeighborListError(
            f"atoms {a} and {b} are {float(dist[k]):.3g} Å apart, closer than the minimum "
            f"distance {MIN_DISTANCE} Å (duplicate positions?)"
        )
    keep = ~self_pair
    i, j, shifts, dist = i[keep], j[keep], shifts[keep], dist[keep]
    if not pbc.all():
        shifts[:, ~pbc] = 0  # offsets along non-periodic directions are zero by construction
    # Sort by centre, then distance (rounded to 1e-8 Å so float noise does not beat the
    # tie rule), then neighbor index, then image offset. Two composite keys keep the
    # sort cheap: (centre, distance) as one float, (j, offset) as one integer.
    primary = i * (2.0 * cutoff + 1.0) + np.round(dist, 8)
    span = int(np.abs(shifts).max(initial=0)) * 2 + 1
    offset_code = ((shifts[:, 0] + span // 2) * span + shifts[:, 1] + span // 2) * span + (
        shifts[:, 2] + span // 2
    )
    secondary = j * span**3 + offset_code
    order = np.lexsort((secondary, primary))
    i, j, shifts = i[order], j[order], shifts[order]
    # rank of each edge within its centre's list
    starts = np.searchsorted(i, i, side="left")
    rank = np.arange(len(i)) - starts
    keep = rank < max_neighbors
    edge_index = np.stack([j[keep], i[keep]])
    return edge_index, shifts[keep]
