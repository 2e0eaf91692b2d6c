"""One-byte codes of periodic image offsets, as the compact graph store holds them.

An image offset (a, b, c) with every component in -2..2 is the code
``((a + 2) * 5 + b + 2) * 5 + c + 2`` (0..124); :data:`OFFSET_TABLE` maps a code back.
Offsets beyond two cells (tiny cells with a long cutoff) are stored as int8 triples
instead (see :mod:`forcenet.data.keys`).
"""

from __future__ import annotations

import numpy as np

#: Largest |component| of an offset that has a one-byte code.
OFFSET_RANGE = 2
_BASE = 2 * OFFSET_RANGE + 1

#: code -> (a, b, c), int64 [125, 3]
OFFSET_TABLE = np.array(
    [
        (a, b, c)
        for a in range(-OFFSET_RANGE, OFFSET_RANGE + 1)
        for b in range(-OFFSET_RANGE, OFFSET_RANGE + 1)
        for c in range(-OFFSET_RANGE, OFFSET_RANGE + 1)
    ],
    dtype=np.int64,
)


def offset_codes(offsets: np.ndarray) -> np.ndarray:
    """uint8 codes of integer offsets [E, 3] whose components all lie in -2..2."""
    shifted = np.asarray(offsets, dtype=np.int64) + OFFSET_RANGE
    return ((shifted[:, 0] * _BASE + shifted[:, 1]) * _BASE + shifted[:, 2]).astype(np.uint8)
