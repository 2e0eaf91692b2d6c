"""Pure geometry functions shared by the data path and the models.

Edge convention (see :mod:`forcenet.data.keys`): ``edge_index[0]`` = neighbor j,
``edge_index[1]`` = centre i, vector = ``pos[j] + cell_offsets @ cell - pos[i]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from forcenet.data import keys as K


def edge_vectors(
    pos: Tensor, cell: Tensor, batch: Tensor, edge_index: Tensor, cell_offsets: Tensor
) -> Tensor:
    """Edge vectors [E, 3] from centre i to the periodic image of neighbor j (Å).

    ``pos`` [N, 3], ``cell`` [G, 3, 3], ``batch`` [N], ``edge_index`` [2, E],
    ``cell_offsets`` [E, 3]. Differentiable in ``pos`` and ``cell``.

    Gathers use ``index_select``: its backward is ``index_add``, which sums in a fixed
    order, whereas the backward of advanced indexing (``pos[j]``) accumulates with atomic
    adds on a multi-threaded CPU once a tensor is large enough, and the forces of an
    energy model (and so its training) then differ in the last bits from run to run.
    """
    j, i = edge_index[0], edge_index[1]
    cell_i = cell.index_select(0, batch.index_select(0, i))  # [E, 3, 3]
    shifts = torch.einsum("ek,ekl->el", cell_offsets.to(cell.dtype), cell_i)  # [E, 3]
    return pos.index_select(0, j) + shifts - pos.index_select(0, i)


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


def random_rotations(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` rotation matrices [n, 3, 3] (float64) drawn uniformly (Haar measure) from SO(3).

    Each comes from a uniformly random unit quaternion (a normalised 4-D Gaussian, drawn
    as one ``randn(n, 4)``). Apply to row vectors as ``x @ R``.
    """
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def random_rotation(generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """One rotation [3, 3]: ``random_rotations(1, generator)[0]`` (the same random stream)."""
    return random_rotations(1, generator)[0].to(dtype)


def rotate_batch(batch: dict[str, Tensor], rot: Tensor) -> dict[str, Tensor]:
    """A copy of ``batch`` with positions, cells and force labels rotated (x -> x @ R).

    ``rot`` [3, 3] rotates the whole batch; ``rot`` [G, 3, 3] rotates structure g by
    ``rot[g]``. Integer ``cell_offsets`` and ``edge_index`` stay valid because the cell
    rotates with the positions, so every edge vector rotates and every distance is kept.
    """
    rot = rot.to(batch[K.POS].device, batch[K.POS].dtype)
    out = dict(batch)
    out[K.CELL] = batch[K.CELL] @ rot  # [G, 3, 3]: each row (lattice vector) rotated
    if rot.dim() == 2:
        out[K.POS] = batch[K.POS] @ rot  # [N, 3]
        if K.FORCES in batch:
            out[K.FORCES] = batch[K.FORCES] @ rot
        return out
    per_atom = rot[batch[K.BATCH]]  # [N, 3, 3]
    out[K.POS] = torch.einsum("nk,nkl->nl", batch[K.POS], per_atom)
    if K.FORCES in batch:
        out[K.FORCES] = torch.einsum("nk,nkl->nl", batch[K.FORCES], per_atom)
    return out


class Triplets(NamedTuple):
    """Index tensors of the triplets k -> j -> i (each [T] int64).

    ``idx_kj`` is the edge k -> j (target j), ``idx_ji`` the edge j -> i (target i);
    ``i``, ``j``, ``k`` are the atoms (centre of the outgoing message, shared atom,
    far atom). Every pair of edges sharing atom j appears once, except the back-edge.
    """

    idx_kj: Tensor
    idx_ji: Tensor
    i: Tensor
    j: Tensor
    k: Tensor


def triplets(edge_index: Tensor, cell_offsets: Tensor, num_nodes: int) -> Triplets:
    """All edge pairs (k -> j, j -> i) sharing atom j, for DimeNet-style messages.

    ``edge_index`` [2, E] (row 0 neighbor/source, row 1 centre/target) and
    ``cell_offsets`` [E, 3] (integer image offsets, any dtype). The back-edge is
    excluded: the edge k -> j whose source is i *and* that points at the same periodic
    image of i, i.e. ``k == i`` and ``offset(k->j) == -offset(j->i)``. In small periodic
    cells another image of i can be a genuine neighbor of j, so comparing atom indices
    alone would drop real triplets. Pure torch, vectorised: edges are grouped by
    target with a stable sort and expanded with ``repeat_interleave``.
    """
    src, dst = edge_index[0], edge_index[1]  # [E]
    device = src.device
    order = torch.argsort(dst, stable=True)  # edges grouped by target atom
    counts = torch.bincount(dst, minlength=num_nodes)  # [N] in-degree
    start = torch.cumsum(counts, 0) - counts  # [N] first sorted slot of each target
    # For edge j -> i, the candidate edges k -> j are the in-edges of j = src.
    n_in = counts[src]  # [E]
    idx_ji = torch.repeat_interleave(torch.arange(src.numel(), device=device), n_in)  # [T0]
    first = torch.cumsum(n_in, 0) - n_in  # [E] first triplet slot of each edge ji
    rank = torch.arange(idx_ji.numel(), device=device) - first[idx_ji]  # [T0]
    idx_kj = order[start[src[idx_ji]] + rank]  # [T0]
    same_atom = src[idx_kj] == dst[idx_ji]
    opposite = (cell_offsets[idx_kj] + cell_offsets[idx_ji] == 0).all(dim=1)
    keep = ~(same_atom & opposite)
    idx_kj, idx_ji = idx_kj[keep], idx_ji[keep]
    return Triplets(idx_kj=idx_kj, idx_ji=idx_ji, i=dst[idx_ji], j=src[idx_ji], k=src[idx_kj])
