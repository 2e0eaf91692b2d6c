"""Sample transforms (data augmentation) applied by :class:`forcenet.data.dataset.FrameDataset`.

ForceNet imposes rotation covariance only through augmentation (Hu et al. 2021): each
time a structure is drawn it is rotated, together with its force labels, by a random
rotation. Integer ``cell_offsets`` and ``edge_index`` stay valid because the cell
rotates with the positions, so every edge vector ``pos[j] + n @ cell - pos[i]`` is
rotated by the same matrix and every distance is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from forcenet.data import keys as K
from forcenet.geometry import random_rotation

#: Fields that are Cartesian row vectors (or rows of vectors) and rotate as ``x @ R``.
ROTATED_FIELDS = (K.POS, K.CELL, K.FORCES)


class RandomRotation:
    """Rotate ``pos``, ``cell`` and ``forces`` of a sample by one uniform (Haar) rotation.

    ``seed``: seed of the transform's own ``torch.Generator`` (None: nondeterministic).
    DataLoader workers reseed it through :meth:`reseed` (see
    :func:`forcenet.data.dataset.make_loader`) so workers draw different rotations.
    Returns a new dict; the input sample and its arrays are never modified.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the rotation stream from ``seed``."""
        self.generator.manual_seed(seed)

    def draw(self) -> np.ndarray:
        """The next rotation matrix [3, 3] (float64), applied to row vectors as ``x @ R``."""
        return random_rotation(self.generator, dtype=torch.float64).numpy()

    def __call__(self, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rot = self.draw()
        out = dict(sample)
        for name in ROTATED_FIELDS:
            if name in out:
                value = np.asarray(out[name])
                out[name] = (value.astype(np.float64) @ rot).astype(value.dtype)  # same shape
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
