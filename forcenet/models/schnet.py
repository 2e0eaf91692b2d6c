"""SchNet under periodic boundaries, forces from the energy gradient (OC20 S2EF baseline).

Schütt et al. 2017, "SchNet: A continuous-filter convolutional neural network for
modeling quantum interactions" (arXiv:1706.08566); OC20 configuration from Chanussot
et al. 2021, "Open Catalyst 2020 (OC20) Dataset and Community Challenges"
(arXiv:2010.09990). The layers are PyTorch Geometric's SchNet parts run on our stored
periodic graph instead of PyG's radius graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn
from torch_geometric.nn.models.schnet import GaussianSmearing, InteractionBlock, ShiftedSoftplus

from forcenet.data import keys as K
from forcenet.geometry import edge_vectors, smooth_cosine_cutoff
from forcenet.nn import check_atomic_numbers, energy_and_forces, gather_mul_scatter

#: Embedding table size (atomic numbers 1..99; OC20 stops at 83).
MAX_ATOMIC_NUMBER = 99


def undirected_pairs(
    edge_index: Tensor, cell_offsets: Tensor, num_nodes: int
) -> tuple[Tensor, Tensor]:
    """Group the directed edges into unordered pairs {(j -> i, n), (i -> j, -n)}.

    ``edge_index`` [2, E], integer-valued ``cell_offsets`` [E, 3] (any dtype). Returns
    ``rep`` [P] (the lowest edge id of each pair, a representative) and ``inverse`` [E]
    (the pair of each edge), so a per-pair quantity ``q`` [P] is ``q[inverse]`` per edge.
    An edge whose reverse is missing (neighbor truncation) forms a pair on its own.
    """
    src, dst = edge_index[0], edge_index[1]  # [E]
    off = cell_offsets.round().to(torch.int64)  # [E, 3]
    # canonical orientation: lower atom first; for an atom's own image, the offset whose
    # first non-zero component is positive
    sign = torch.sign(off[:, 0]) * 4 + torch.sign(off[:, 1]) * 2 + torch.sign(off[:, 2])
    flip = (src > dst) | ((src == dst) & (sign < 0))  # [E]
    a, b = torch.where(flip, dst, src), torch.where(flip, src, dst)
    off = torch.where(flip.unsqueeze(-1), -off, off)
    span = 2 * int(off.abs().max()) + 1 if off.numel() else 1
    code = ((off[:, 0] + span // 2) * span + off[:, 1] + span // 2) * span + off[:, 2] + span // 2
    key = (a * num_nodes + b) * span**3 + code  # [E] unique per unordered pair
    _, inverse = torch.unique(key, return_inverse=True)  # [E]
    edge_ids = torch.arange(src.numel(), device=src.device)
    n_pairs = int(inverse.max()) + 1 if inverse.numel() else 0
    rep = torch.full((n_pairs,), src.numel(), dtype=torch.int64, device=src.device)
    rep = rep.scatter_reduce(0, inverse, edge_ids, reduce="amin")  # [P]
    return rep, inverse


class SchNet(nn.Module):
    """SchNet energy model; forces are -dE/dpos, so they are conservative and covariant.

    Idea: atoms exchange messages through continuous filters generated from the
    (periodic) interatomic distance, and the energy is a sum of atomic terms.

    Args (keyword-only; defaults are the OCP S2EF configs):
        hidden_channels: atom embedding width (default 1024).
        num_filters: width of the continuous filters / CFConv (default 256).
        num_interactions: number of interaction blocks (default 3; OCP 2M/All use 5).
        num_gaussians: Gaussians expanding the distance on [0, cutoff] (default 200).
        cutoff: interaction cutoff in Å, also the cosine-cutoff radius (default 6.0);
            should equal the neighbor-list cutoff the graph was built with.

    ``forward(batch)`` returns ``"energy"`` [G] (eV, referenced) and ``"forces"``
    [N, 3] (eV/Å). Training mode keeps the force graph (``create_graph``) so a force
    loss can be back-propagated (as it does when ``batch["pos"]`` already requires grad);
    under ``torch.no_grad()`` it still computes forces and returns detached tensors.
    """

    energy_from_gradient = True

    def __init__(
        self,
        *,
        hidden_channels: int = 1024,
        num_filters: int = 256,
        num_interactions: int = 3,
        num_gaussians: int = 200,
        cutoff: float = 6.0,
    ) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.num_filters = num_filters
        self.num_interactions = num_interactions
        self.num_gaussians = num_gaussians
        self.cutoff = cutoff
        self.embedding = nn.Embedding(MAX_ATOMIC_NUMBER + 1, hidden_channels, padding_idx=0)
        self.distance_expansion = GaussianSmearing(0.0, cutoff, num_gaussians)
        self.interactions = nn.ModuleList(
            InteractionBlock(hidden_channels, num_gaussians, num_filters, cutoff)
            for _ in range(num_interactions)
        )
        self.lin1 = nn.Linear(hidden_channels, hidden_channels // 2)
        self.act = ShiftedSoftplus()
        self.lin2 = nn.Linear(hidden_channels // 2, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyG/SchNetPack initialisation: Xavier weights, zero biases."""
        self.embedding.reset_parameters()
        for block in self._blocks():
            block.reset_parameters()
        for lin in (self.lin1, self.lin2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _blocks(self) -> Iterable[InteractionBlock]:
        # nn.ModuleList is not generic in torch's stubs; every item is an InteractionBlock
        return cast("Iterable[InteractionBlock]", self.interactions)

    def energy(self, batch: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Referenced energy [G] (eV) as a differentiable function of ``pos`` [N, 3]."""
        z = batch[K.ATOMIC_NUMBERS]  # [N]
        check_atomic_numbers(z, MAX_ATOMIC_NUMBER, "SchNet")
        edge_index, offsets = batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
        # Filters depend on the distance only, so each undirected pair (both directions
        # of an edge) is expanded once: about half the work of the filter networks.
        rep, inverse = undirected_pairs(edge_index, offsets, z.shape[0])  # [P], [E]
        vec = edge_vectors(pos, batch[K.CELL], batch[K.BATCH], edge_index[:, rep], offsets[rep])
        dist = vec.norm(dim=-1)  # [P]
        rbf = self.distance_expansion(dist)  # [P, num_gaussians]
        envelope = smooth_cosine_cutoff(dist, self.cutoff).unsqueeze(-1)  # [P, 1]
        j, i = edge_index[0], edge_index[1]
        h = self.embedding(z)  # [N, hidden]
        for block in self._blocks():
            # PyG's InteractionBlock/CFConv forward (message x_j * W_ij, summed at i), with
            # the filter computed once per pair and looked up per edge inside the fused
            # gather-multiply-scatter (no [E, num_filters] filter copy).
            filt = block.mlp(rbf) * envelope  # [P, num_filters]
            x = gather_mul_scatter(block.conv.lin1(h), filt, j, i, z.shape[0], inverse)
            h = h + block.lin(block.act(block.conv.lin2(x)))
        atomic = self.lin2(self.act(self.lin1(h))).squeeze(-1)  # [N]
        n_graphs = batch[K.NATOMS].shape[0]
        return atomic.new_zeros(n_graphs).index_add(0, batch[K.BATCH], atomic)  # [G]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return energy_and_forces(self.energy, batch, training=self.training)

    def extra_repr(self) -> str:
        return (
            f"hidden_channels={self.hidden_channels}, num_filters={self.num_filters}, "
            f"num_interactions={self.num_interactions}, num_gaussians={self.num_gaussians}, "
            f"cutoff={self.cutoff}"
        )
