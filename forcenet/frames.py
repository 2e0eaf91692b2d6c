"""Frame averaging: exact rotation covariance for a model that is not covariant by itself.

Each structure gets the frames of its principal axes: the eigenvectors ``U`` [3, 3] of
the covariance of its atom positions, with each of the 8 sign choices ``S`` (an
eigenvector's sign is arbitrary), so ``M = U S`` is orthogonal. A model runs on the
structure seen in a frame (positions ``pos @ M``, the cell's rows ``cell @ M``; the graph,
with its cell offsets, is unchanged since every edge vector turns the same way) and its
forces are turned back (``f @ M^T``). A rotation or reflection ``Q`` of the input turns
``U`` into ``Q U`` up to the signs, so the set of framed inputs is the same and the
averaged forces turn with ``Q`` exactly (Puny et al. 2022; Duval et al. 2023).

Modes (:data:`FrameMode`): ``"stochastic"`` runs one frame per structure drawn at random
in training (the model must still learn the average) and averages all 8 in evaluation;
``"full"`` averages all 8 frames always (8 forwards per batch).

**Degenerate frames.** When two principal variances tie, their eigenvectors are any
orthonormal pair of the tied plane, and which one ``eigh`` returns is not covariant: the
averaged model is then covariant only about the third axis. This is common (a slab with
an in-plane 3-fold or 4-fold symmetry has an isotropic in-plane covariance; so does a
small symmetric molecule). :func:`pca_frames` flags a structure as degenerate when a gap
between neighbouring variances is below :data:`DEGENERATE_GAP` of the largest; such
structures still get their frames (the model runs and stays smooth), and
:func:`degenerate_fraction` counts them so that a rotation-covariance figure can say how
many structures it rests on.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import Tensor, nn

from forcenet.data import keys as K

FrameMode = Literal["none", "stochastic", "full"]

#: A structure's frame is degenerate when two neighbouring principal variances differ by
#: less than this fraction of the largest.
DEGENERATE_GAP = 1e-3

#: The 8 sign choices of the three principal axes, [8, 3].
SIGNS = torch.tensor(list(itertools.product((1.0, -1.0), repeat=3)))


def pca_frames(pos: Tensor, batch: Tensor, num_graphs: int) -> tuple[Tensor, Tensor]:
    """The 8 frames of every structure and whether each is degenerate.

    ``pos`` [N, 3], ``batch`` [N] (structure of each atom). Returns ``frames``
    [G, 8, 3, 3] (orthogonal; column ``a`` of ``frames[g, k]`` is principal axis ``a``
    times its sign in choice ``k``, axes by increasing variance) and ``degenerate`` [G]
    bool. Computed in float64 whatever the dtype of ``pos``; the frames are returned in
    it. Differentiable in ``pos`` (so a Jacobian of the averaged forces includes how the
    frames move), except at degenerate frames, whose eigenvector derivatives diverge. A
    structure of one atom has a zero covariance: degenerate, identity axes.
    """
    p = pos.to(torch.float64)
    ones = torch.ones(len(p), dtype=p.dtype, device=p.device)
    count = torch.zeros(num_graphs, dtype=p.dtype, device=p.device).index_add_(0, batch, ones)
    mean = torch.zeros(num_graphs, 3, dtype=p.dtype, device=p.device).index_add_(0, batch, p)
    centred = p - (mean / count.clamp(min=1)[:, None]).index_select(0, batch)  # [N, 3]
    outer = centred[:, :, None] * centred[:, None, :]  # [N, 3, 3]
    cov = torch.zeros(num_graphs, 3, 3, dtype=p.dtype, device=p.device).index_add_(
        0, batch, outer
    )  # [G, 3, 3]
    variances, axes = torch.linalg.eigh(cov)  # ascending [G, 3], columns [G, 3, 3]
    gaps = (variances[:, 1:] - variances[:, :-1]).min(dim=1).values  # [G]
    degenerate = gaps <= DEGENERATE_GAP * variances[:, 2].clamp(min=0)
    signs = SIGNS.to(device=p.device, dtype=p.dtype)  # [8, 3]
    frames = axes[:, None, :, :] * signs[None, :, None, :]  # [G, 8, 3, 3]
    return frames.to(pos.dtype), degenerate


def degenerate_fraction(pos: Tensor, batch: Tensor, num_graphs: int) -> float:
    """The share of structures whose frames are degenerate (see the module docstring)."""
    return float(pca_frames(pos, batch, num_graphs)[1].to(torch.float64).mean())


def in_frame(model: nn.Module, batch: dict[str, Tensor], frame: Tensor) -> dict[str, Tensor]:
    """``model``'s output for every structure seen in its ``frame`` [G, 3, 3], with the
    forces turned back to the input's axes (energies are invariant)."""
    per_atom = frame.index_select(0, batch[K.BATCH])  # [N, 3, 3]
    framed = {
        **batch,
        K.POS: torch.einsum("ni,nij->nj", batch[K.POS], per_atom),
        K.CELL: torch.bmm(batch[K.CELL].to(frame.dtype), frame),  # rows turn like positions
    }
    out = dict(model(framed))
    out[K.OUT_FORCES] = torch.einsum("nj,nij->ni", out[K.OUT_FORCES], per_atom)
    return out


class FrameAveraging(nn.Module):
    """Runs a direct-force model in the principal-axis frames of each structure.

    ``mode`` ``"stochastic"``: in training mode one frame per structure drawn with the
    global torch RNG (saved and restored with a run), in eval mode the average over all
    8; ``"full"``: always the average. Holds no parameters, so a model's state dict is the
    same with or without it.
    """

    def __init__(self, mode: FrameMode) -> None:
        super().__init__()
        if mode not in ("stochastic", "full"):
            raise ValueError(f"frame averaging mode {mode!r}: expected 'stochastic' or 'full'")
        self.mode = mode

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        num_graphs = len(batch[K.NATOMS])
        frames, _ = pca_frames(batch[K.POS], batch[K.BATCH], num_graphs)  # [G, 8, 3, 3]
        if self.training and self.mode == "stochastic":
            pick = torch.randint(0, 8, (num_graphs,)).to(frames.device)  # [G]
            return in_frame(model, batch, frames[torch.arange(num_graphs), pick])
        outs = [in_frame(model, batch, frames[:, k]) for k in range(8)]
        return {key: torch.stack([o[key] for o in outs]).mean(dim=0) for key in outs[0]}
