"""One labelled structure (a frame of a relaxation or MD trajectory) as plain arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms

from forcenet.data import keys as K


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """[N] bool, True for the atoms held by a ``FixAtoms`` constraint (``Frame.fixed``);
    the free atoms are ``~fixed_mask(atoms)``."""
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.get_indices()] = True
    return fixed


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
        if np.any(z < 1) or np.any(z > 118):
            raise FrameError(f"{where}: atomic number outside 1..118: {sorted(set(z.tolist()))}")
        if np.any(self.pbc):
            vol = abs(float(np.linalg.det(self.cell)))
            if vol < 1e-6:
                raise FrameError(f"{where}: periodic cell has zero volume")

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
