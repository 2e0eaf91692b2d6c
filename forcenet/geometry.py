"""Pure geometry functions shared by the data path and the models.

Edge convention (see :mod:`forcenet.data.keys`): ``edge_index[0]`` = neighbor j,
``edge_index[1]`` = centre i, vector = ``pos[j] + cell_offsets @ cell - pos[i]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def edge_vectors(
    pos: Tensor, cell: Tensor, batch: Tensor, edge_index: Tensor, cell_offsets: Tensor
) -> Tensor:
    """Edge vectors [E, 3] from centre i to the periodic image of neighbor j (Å).

    ``pos`` [N, 3], ``cell`` [G, 3, 3], ``batch`` [N], ``edge_index`` [2, E],
    ``cell_offsets`` [E, 3]. Differentiable in ``pos`` and ``cell``.
    """
    j, i = edge_index[0], edge_index[1]
    shifts = torch.einsum("ek,ekl->el", cell_offsets.to(cell.dtype), cell[batch[i]])  # [E, 3]
    return pos[j] + shifts - pos[i]


def gradient_forces(energy: Tensor, pos: Tensor, *, create_graph: bool) -> Tensor:
    """Forces = -dE/dpos (eV/Å) for a per-graph energy [G] and positions [N, 3]."""
    (grad,) = torch.autograd.grad(
        energy.sum(), pos, create_graph=create_graph, retain_graph=create_graph
    )
    return -grad


def cosine_envelope(d: Tensor, cutoff: float) -> Tensor:
    """ForceNet's edge weight cos(pi d / (2 cutoff)): 1 at d = 0, 0 at the cutoff."""
    return torch.cos(d * (math.pi / (2.0 * cutoff))).clamp(min=0.0) * (d < cutoff)


def smooth_cosine_cutoff(d: Tensor, cutoff: float) -> Tensor:
    """SchNet's cutoff 0.5 (cos(pi d / cutoff) + 1), zero beyond the cutoff."""
    return 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0) * (d < cutoff)


def random_rotation(generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """A rotation matrix [3, 3] drawn uniformly (Haar measure) from SO(3).

    Uses a uniformly random unit quaternion (normalised 4-D Gaussian).
    Apply to row vectors as ``x @ R``.
    """
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q.tolist()
    rot = torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )
    return rot.to(dtype)
