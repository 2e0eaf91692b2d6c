"""One labelled structure (a frame of a relaxation or MD trajectory) as plain arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms
from numpy.typing import ArrayLike

from forcenet.data import keys as K


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """[N] bool, True for the atoms held by a ``FixAtoms`` constraint (``Frame.fixed``);
    the free atoms are ``~fixed_mask(atoms)``."""
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    return fixed


#: Highest atomic number a frame may hold: the models' per-element tables (embeddings,
#: ForceNet's element properties) cover Z = 1..100.
MAX_Z = 100
#: Closest two atoms may be (Å). Closer pairs (duplicate positions, unit mix-ups) are
#: refused: a neighbor list would drop a zero-length edge silently, and the models'
#: radial bases are singular or meaningless there.
MIN_DISTANCE = 0.1


#: Structures up to this many atoms are checked pair by pair (a cell list costs more there).
_DIRECT_MAX_ATOMS = 256
#: Radius (Å) of the cell-list search for candidate pairs: any radius >= MIN_DISTANCE finds
#: every close pair; a larger one keeps vesin's grid coarse (its cost grows as radius⁻³).
_SEARCH_RADIUS = 2.0
_BLOCK = 128  # rows per block of the pair-by-pair check


def geometry_problem(pos: ArrayLike, cell: ArrayLike, pbc: ArrayLike) -> str | None:
    """What makes a structure's positions and cell unusable for a neighbor list, or None.

    Positions and the cell must be finite (a NaN reaching the neighbor search is a
    floating-point crash, not an error message), a periodic cell must have volume, and
    along every periodic direction its width (the spacing of the lattice planes) must be
    at least :data:`MIN_DISTANCE`: a thinner cell puts an atom closer than that to its own
    image, and the search would have to visit millions of images.
    """
    pos = np.asarray(pos)
    if not np.isfinite(pos).all():
        bad = np.flatnonzero(~np.isfinite(pos.reshape(len(pos), -1)).all(axis=1))
        return f"positions contain NaN or inf (atom {int(bad[0])})"
    # plain floats from here: a few numpy calls per structure would cost more than the rest
    rows = np.asarray(cell, dtype=np.float64).reshape(3, 3).tolist()
    if not all(map(math.isfinite, rows[0] + rows[1] + rows[2])):
        return f"cell contains NaN or inf: {rows}"
    periodic = np.asarray(pbc, dtype=bool).reshape(3).tolist()
    if not any(periodic):
        return None
    a, b, c = rows
    volume = abs(_dot(a, _cross(b, c)))
    if volume < 1e-9:
        return "periodic cell has zero volume"
    for k, (u, v) in enumerate(((b, c), (c, a), (a, b))):
        if not periodic[k]:
            continue
        area = _cross(u, v)
        width = volume / math.sqrt(_dot(area, area))
        if width < MIN_DISTANCE:
            return (
                f"periodic cell is degenerate: {width:.3g} Å wide along cell vector {k}, "
                f"below the minimum distance {MIN_DISTANCE} Å"
            )
    return None


def _cross(u: list[float], v: list[float]) -> list[float]:
    return [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]


def _dot(u: list[float], v: list[float]) -> float:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def check_atoms_geometry(atoms: Atoms, where: str) -> None:
    """Raise :class:`FrameError` (prefixed by ``where``, e.g. the file and structure)
    unless the positions and cell of ``atoms`` pass :func:`geometry_problem`."""
    problem = geometry_problem(atoms.positions, atoms.cell.array, atoms.pbc)
    if problem is not None:
        raise FrameError(f"{where}: {problem}")


def close_pair(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> tuple[int, int, float] | None:
    """A pair of atoms (i < j, distance in Å) closer than :data:`MIN_DISTANCE`,
    periodic images included (minimum image along periodic directions), or None.

    The distance of a pair is that of its image nearest in fractional coordinates
    (exact for cells whose widths exceed 2 * MIN_DISTANCE; an atom's own images are
    not checked). Small structures are checked pair by pair; larger ones only on the
    candidate pairs of a cell-list search (vesin), O(N), with the same arithmetic and
    the same answer (which pair is named, too). Among several close pairs the one named
    is the closest of those whose first atom lies in the lowest block of 128 atoms.
    """
    pos = np.asarray(pos, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    periodic = bool(pbc.any())
    # fractional coordinates along the cell when periodic (the cell has volume: validated)
    coords = np.linalg.solve(cell.T, pos.T).T if periodic else pos  # [N, 3]
    if len(pos) <= _DIRECT_MAX_ATOMS:
        return _close_pair_direct(coords, cell, pbc)
    return _close_pair_searched(pos, coords, cell, pbc)


def _squared_distances(diff: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """[...] squared lengths of ``diff`` [..., 3] (fractional when periodic: the image
    nearest in fractional coordinates along each periodic direction)."""
    if pbc.any():
        diff[..., pbc] -= np.round(diff[..., pbc])
        diff = diff @ cell
    return np.einsum("...k,...k->...", diff, diff)


def _close_pair_direct(
    coords: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> tuple[int, int, float] | None:
    """:func:`close_pair` over all pairs, in blocks of rows (O(N) memory per block)."""
    n = len(coords)
    for start in range(0, n, _BLOCK):
        rows = np.arange(start, min(start + _BLOCK, n))  # [B]
        d2 = _squared_distances(coords[None, :] - coords[rows, None], cell, pbc)  # [B, N]
        d2[np.arange(len(rows)), rows] = np.inf  # not an atom with itself
        k = int(np.argmin(d2))
        r, c = divmod(k, n)
        if d2[r, c] < MIN_DISTANCE**2:
            i, j = sorted((int(rows[r]), c))
            return i, j, float(np.sqrt(d2[r, c]))
    return None


def _close_pair_searched(
    pos: np.ndarray, coords: np.ndarray, cell: np.ndarray, pbc: np.ndarray
) -> tuple[int, int, float] | None:
    """:func:`close_pair` on the pairs within :data:`_SEARCH_RADIUS` of any image: a pair
    whose nearest fractional image is within MIN_DISTANCE is among them."""
    import vesin  # here: importing it costs time that small structures need not pay

    box = cell if pbc.any() else np.zeros((3, 3))
    search = vesin.NeighborList(cutoff=_SEARCH_RADIUS, full_list=False)
    i, j = search.compute(points=pos, box=box, periodic=pbc.tolist(), quantities="ij")
    pairs = np.unique(np.sort(np.stack([i, j], axis=1), axis=1), axis=0)  # [P, 2] i <= j
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    # both orders, as the direct check sees each pair once from each of its atoms
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])  # [2P]
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])  # [2P]
    d2 = _squared_distances(coords[cols] - coords[rows], cell, pbc)  # [2P]
    close = d2 < MIN_DISTANCE**2
    if not close.any():
        return None
    rows, cols, d2 = rows[close], cols[close], d2[close]
    first = rows // _BLOCK == (rows // _BLOCK).min()  # the block the direct check stops at
    rows, cols, d2 = rows[first], cols[first], d2[first]
    k = np.lexsort((cols, rows, d2))[0]  # its argmin: closest, then by row, then column
    i, j = sorted((int(rows[k]), int(cols[k])))
    return i, j, float(np.sqrt(d2[k]))


class FrameError(ValueError):
    """A frame that is not physically usable; the message names the file and record."""


@dataclass(frozen=True)
class Frame:
    """A labelled frame. Shapes and units as in :mod:`forcenet.data.keys`.

    ``reference_energy`` is the per-system reference (clean slab + gas-phase
    references in OC20); the referenced energy is ``total_energy - reference_energy``.
    """

    atomic_numbers: np.ndarray  # [N] int64
    pos: np.ndarray  # [N, 3] float64, Å
    cell: np.ndarray  # [3, 3] float64, Å, rows are lattice vectors
    pbc: np.ndarray  # [3] bool
    tags: np.ndarray  # [N] int64
    fixed: np.ndarray  # [N] bool
    forces: np.ndarray  # [N, 3] float64, eV/Å
    total_energy: float  # eV
    reference_energy: float  # eV
    sid: int
    fid: int
    free_energy: float | None = None

    @property
    def natoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def energy(self) -> float:
        """Referenced energy (eV)."""
        return float(self.total_energy - self.reference_energy)

    def validate(self, where: str) -> None:
        """Raise :class:`FrameError` (prefixed by ``where``) unless the frame is usable."""
        n = self.natoms
        if n == 0:
            raise FrameError(f"{where}: empty structure (0 atoms)")
        checks = {
            "pos": (self.pos, (n, 3)),
            "forces": (self.forces, (n, 3)),
            "tags": (self.tags, (n,)),
            "fixed": (self.fixed, (n,)),
            "cell": (self.cell, (3, 3)),
            "pbc": (self.pbc, (3,)),
        }
        for name, (arr, shape) in checks.items():
            if arr.shape != shape:
                raise FrameError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
        for name in ("pos", "forces", "cell"):
            arr = getattr(self, name)
            if not np.all(np.isfinite(arr)):
                raise FrameError(f"{where}: {name} contains NaN or inf")
        for name in ("total_energy", "reference_energy"):
            if not np.isfinite(getattr(self, name)):
                raise FrameError(f"{where}: {name} is not finite")
        z = self.atomic_numbers
        if np.any(z < 1) or np.any(z > MAX_Z):
            bad = sorted(set(z[(z < 1) | (z > MAX_Z)].tolist()))
            raise FrameError(
                f"{where}: atomic number outside 1..{MAX_Z} (the models' element range): {bad}"
            )
        if np.any(self.pbc):
            vol = abs(float(np.linalg.det(self.cell)))
            if vol < 1e-6:
                raise FrameError(f"{where}: periodic cell has zero volume")
        pair = close_pair(self.pos, self.cell, self.pbc)
        if pair is not None:
            i, j, d = pair
            raise FrameError(
                f"{where}: atoms {i} and {j} are {d:.3g} Å apart, closer than the minimum "
                f"distance {MIN_DISTANCE} Å (duplicate positions?)"
            )

    def to_record(self) -> dict[str, np.ndarray]:
        """The LMDB frame record (see :mod:`forcenet.data.keys`)."""
        return {
            K.POS: np.asarray(self.pos, dtype=np.float32),
            K.CELL: np.asarray(self.cell, dtype=np.float32),
            K.PBC: np.asarray(self.pbc, dtype=bool),
            K.ATOMIC_NUMBERS: np.asarray(self.atomic_numbers, dtype=np.int64),
            K.TAGS: np.asarray(self.tags, dtype=np.int64),
            K.FIXED: np.asarray(self.fixed, dtype=bool),
            K.FORCES: np.asarray(self.forces, dtype=np.float32),
            K.ENERGY: np.asarray(self.energy, dtype=np.float64),
            K.TOTAL_ENERGY: np.asarray(self.total_energy, dtype=np.float64),
            K.SID: np.asarray(self.sid, dtype=np.int64),
            K.FID: np.asarray(self.fid, dtype=np.int64),
        }
