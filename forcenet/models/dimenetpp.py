"""DimeNet++ under periodic boundaries, forces from the energy gradient (OC20 S2EF baseline).

Gasteiger et al. 2020, "Fast and Uncertainty-Aware Directional Message Passing for
Non-Equilibrium Molecules" (arXiv:2011.14115), building on Gasteiger et al. 2020,
"Directional Message Passing for Molecular Graphs" (DimeNet, arXiv:2003.03123); OC20
configuration from Chanussot et al. 2021 (arXiv:2010.09990). The blocks are PyTorch
Geometric's; the graph, triplets and angles come from our stored periodic graph, so
no torch-sparse is needed and triplets across periodic images are right.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache, partial
from typing import Literal, cast, get_args

import sympy as sym
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.models.dimenet import (
    BesselBasisLayer,
    EmbeddingBlock,
    Envelope,
    InteractionPPBlock,
    OutputPPBlock,
    SphericalBasisLayer,
)
from torch_geometric.nn.models.dimenet_utils import bessel_basis, real_sph_harm

from forcenet.data import keys as K
from forcenet.geometry import edge_vectors, triplets
from forcenet.nn import check_atomic_numbers, energy_and_forces, gather_mul_scatter

OutputInit = Literal["zeros", "glorot_orthogonal"]

#: PyG's EmbeddingBlock table has 95 rows (atomic numbers 1..94; OC20 stops at 83).
MAX_ATOMIC_NUMBER = 94


@lru_cache(maxsize=8)
def _basis_functions(num_spherical: int, num_radial: int) -> tuple[tuple, tuple]:
    """Torch callables of PyG's DimeNet basis, built with sympy once per process.

    Returns ``(sph_funcs, bessel_funcs)``: the m = 0 real spherical harmonics as
    polynomials in cos(angle) (``num_spherical`` of them) and the normalised spherical
    Bessel functions of d / cutoff (``num_spherical * num_radial``). Building them takes
    seconds (18 s for 7 x 6 on one core), so repeated model construction reuses them.
    """
    x, z = sym.symbols("x z")
    modules = {"sin": torch.sin, "cos": torch.cos}
    bessel_forms = bessel_basis(num_spherical, num_radial)
    sph_forms = real_sph_harm(num_spherical, zero_m_only=True, spherical_coordinates=False)
    sph_funcs, bessel_funcs = [], []
    for l_order in range(num_spherical):
        form = sym.sympify(sph_forms[l_order][0])
        if form.free_symbols:
            sph_funcs.append(sym.lambdify([z], form, modules))
        else:  # Y_0^0 is a constant
            sph_funcs.append(partial(SphericalBasisLayer._sph_to_tensor, float(form)))
        for n in range(num_radial):
            bessel_funcs.append(sym.lambdify([x], bessel_forms[l_order][n], modules))
    return tuple(sph_funcs), tuple(bessel_funcs)


class CosineSphericalBasis(SphericalBasisLayer):
    """PyG's 2-D spherical Fourier-Bessel basis, fed cos(angle) instead of the angle.

    The m = 0 real spherical harmonics are polynomials in cos(angle), so evaluating
    them on the cosine gives the same values while keeping second derivatives finite
    for collinear triplets (common in crystals), where d(angle)/d(pos) has a kink.
    ``forward(dist [E], cos_angle [T], idx_kj [T]) -> [T, num_spherical * num_radial]``
    computes PyG's values; construction (cached sympy functions, no parameters) and the
    per-triplet gather (index_select) differ.
    """

    def __init__(
        self, num_spherical: int, num_radial: int, cutoff: float, envelope_exponent: int
    ) -> None:
        nn.Module.__init__(self)  # PyG's __init__ would redo the slow sympy work
        if not 1 <= num_radial <= 64:
            raise ValueError(f"num_radial must be in 1..64, got {num_radial}")
        self.num_spherical = num_spherical
        self.num_radial = num_radial
        self.cutoff = cutoff
        self.envelope = Envelope(envelope_exponent)
        sph_funcs, bessel_funcs = _basis_functions(num_spherical, num_radial)
        self.sph_funcs = list(sph_funcs)
        self.bessel_funcs = list(bessel_funcs)

    def forward(self, dist: Tensor, angle: Tensor, idx_kj: Tensor) -> Tensor:
        # PyG's forward with index_select for the per-triplet gather: its backward is an
        # index_add, where rbf[idx_kj] would back-propagate through a slow index_put.
        dist = dist / self.cutoff
        rbf = torch.stack([f(dist) for f in self.bessel_funcs], dim=1)
        rbf = self.envelope(dist).unsqueeze(-1) * rbf  # [E, n * k]
        cbf = torch.stack([f(angle) for f in self.sph_funcs], dim=1)  # [T, n]
        n, k = self.num_spherical, self.num_radial
        out = rbf.index_select(0, idx_kj).view(-1, n, k) * cbf.view(-1, n, 1)
        return out.view(-1, n * k)


class TripletInteraction(InteractionPPBlock):
    """PyG's DimeNet++ interaction block (same submodules and parameters), fed the
    spherical basis already through its first projection ``lin_sbf1`` ([T, basis_emb]).

    The model applies ``lin_sbf1`` of all blocks to the shared [T, S * R] basis in one
    GEMM (the per-block Linears side by side, so the basis gradient comes out summed),
    and the triplet messages x_kj[idx_kj] * sbf are gathered, multiplied and summed per
    edge j -> i by :func:`gather_mul_scatter` (no [T, int_emb] copy of x_kj kept).
    """

    def forward(
        self, x: Tensor, rbf: Tensor, sbf_emb: Tensor, idx_kj: Tensor, idx_ji: Tensor
    ) -> Tensor:
        x_ji = self.act(self.lin_ji(x))
        x_kj = self.act(self.lin_kj(x)) * self.lin_rbf2(self.lin_rbf1(rbf))
        x_kj = self.act(self.lin_down(x_kj))  # [E, int_emb]
        x_kj = gather_mul_scatter(x_kj, self.lin_sbf2(sbf_emb), idx_kj, idx_ji, x.shape[0])
        h = x_ji + self.act(self.lin_up(x_kj))
        for layer in self.layers_before_skip:
            h = layer(h)
        h = self.act(self.lin(h)) + x
        for layer in self.layers_after_skip:
            h = layer(h)
        return h


class DimeNetPlusPlus(nn.Module):
    """DimeNet++ energy model; forces are -dE/dpos (conservative, rotation covariant).

    Idea: messages live on directed edges and are updated from neighbouring edges
    through a basis of the distance and the angle between the two edges (triplets
    k -> j -> i), which makes the model sensitive to bond angles.

    Args (keyword-only; defaults are the OCP S2EF configs):
        hidden_channels: edge-message width (default 192).
        out_emb_channels: width of the output blocks' MLPs (default 192).
        num_blocks: number of interaction blocks (default 3).
        int_emb_size: triplet-interaction embedding width (default 64).
        basis_emb_size: basis-embedding bottleneck width (default 8).
        num_spherical: number of spherical harmonics (angular orders, default 7).
        num_radial: number of radial Bessel functions (default 6).
        cutoff: cutoff in Å of the radial basis and envelope (default 6.0); should
            equal the neighbor-list cutoff the graph was built with.
        envelope_exponent: exponent p of the polynomial envelope (default 5).
        num_before_skip: residual layers before the skip connection (default 1).
        num_after_skip: residual layers after the skip connection (default 2).
        num_output_layers: linear layers in each output block (default 3).
        output_initializer: initial weights of each output block's last layer:
            ``"zeros"`` (default, as in the reference code: an untrained model predicts
            E = 0 and F = 0) or ``"glorot_orthogonal"`` (non-trivial from the start).

    Activation is swish (SiLU). ``forward(batch)`` returns ``"energy"`` [G] (eV,
    referenced) and ``"forces"`` [N, 3] (eV/Å); training mode keeps the force graph so a
    force loss can be back-propagated, and under ``torch.no_grad()`` forces are still
    computed and returned detached.
    """

    energy_from_gradient = True

    def __init__(
        self,
        *,
        hidden_channels: int = 192,
        out_emb_channels: int = 192,
        num_blocks: int = 3,
        int_emb_size: int = 64,
        basis_emb_size: int = 8,
        num_spherical: int = 7,
        num_radial: int = 6,
        cutoff: float = 6.0,
        envelope_exponent: int = 5,
        num_before_skip: int = 1,
        num_after_skip: int = 2,
        num_output_layers: int = 3,
        output_initializer: OutputInit = "zeros",
    ) -> None:
        super().__init__()
        self.hparams = dict(
            hidden_channels=hidden_channels,
            out_emb_channels=out_emb_channels,
            num_blocks=num_blocks,
            int_emb_size=int_emb_size,
            basis_emb_size=basis_emb_size,
            num_spherical=num_spherical,
            num_radial=num_radial,
            cutoff=cutoff,
            envelope_exponent=envelope_exponent,
            num_before_skip=num_before_skip,
            num_after_skip=num_after_skip,
            num_output_layers=num_output_layers,
            output_initializer=output_initializer,
        )
        if output_initializer not in get_args(OutputInit):
            raise ValueError(
                f"output_initializer must be one of {get_args(OutputInit)}, "
                f"got {output_initializer!r}"
            )
        self.cutoff = cutoff
        act = F.silu  # swish, x * sigmoid(x), in one kernel (PyG's is two ops)
        self.rbf = BesselBasisLayer(num_radial, cutoff, envelope_exponent)
        self.sbf = CosineSphericalBasis(num_spherical, num_radial, cutoff, envelope_exponent)
        self.emb = EmbeddingBlock(num_radial, hidden_channels, act)
        self.output_blocks = nn.ModuleList(
            OutputPPBlock(
                num_radial,
                hidden_channels,
                out_emb_channels,
                1,
                num_output_layers,
                act,
                output_initializer,
            )
            for _ in range(num_blocks + 1)
        )
        self.interaction_blocks = nn.ModuleList(
            TripletInteraction(
                hidden_channels,
                int_emb_size,
                basis_emb_size,
                num_spherical,
                num_radial,
                num_before_skip,
                num_after_skip,
                act,
            )
            for _ in range(num_blocks)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation (glorot-orthogonal, zero output layers)."""
        self.rbf.reset_parameters()
        self.emb.reset_parameters()
        for block in (*self.output_blocks, *self.interaction_blocks):
            block.reset_parameters()

    def energy(self, batch: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Referenced energy [G] (eV) as a differentiable function of ``pos`` [N, 3]."""
        z = batch[K.ATOMIC_NUMBERS]  # [N]
        check_atomic_numbers(z, MAX_ATOMIC_NUMBER, "DimeNet++")
        n_atoms = z.shape[0]
        edge_index, offsets = batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
        trip = triplets(edge_index, offsets, n_atoms)
        # vec[e] points from the centre i of edge e to the image of its neighbor j.
        vec = edge_vectors(pos, batch[K.CELL], batch[K.BATCH], edge_index, offsets)  # [E, 3]
        dist = vec.norm(dim=-1)  # [E]
        # Angle between x_j - x_i (edge ji) and x_k - x_j (edge kj), both with images.
        # index_select, not vec[idx]: its backward is an index_add, not a slow index_put
        vec_ji, vec_kj = vec.index_select(0, trip.idx_ji), vec.index_select(0, trip.idx_kj)
        norms = dist.index_select(0, trip.idx_ji) * dist.index_select(0, trip.idx_kj)  # [T]
        cos_angle = (vec_ji * vec_kj).sum(-1) / norms  # [T]
        rbf = self.rbf(dist)  # [E, num_radial]
        sbf = self.sbf(dist, cos_angle, trip.idx_kj)  # [T, num_spherical * num_radial]
        i, j = edge_index[1], edge_index[0]
        x = self.emb(z, rbf, i, j)  # [E, hidden]
        atomic = self.output_blocks[0](x, rbf, i, num_nodes=n_atoms)  # [N, 1]
        # nn.ModuleList is not generic in torch's stubs; every item is a TripletInteraction
        blocks = cast("Iterable[TripletInteraction]", self.interaction_blocks)
        sbf_lins = [block.lin_sbf1.weight for block in blocks]
        sbf_emb = (sbf @ torch.cat(sbf_lins).t()).split(sbf_lins[0].shape[0], dim=-1)
        for interaction, output, sbf_block in zip(
            self.interaction_blocks, self.output_blocks[1:], sbf_emb, strict=True
        ):
            x = interaction(x, rbf, sbf_block, trip.idx_kj, trip.idx_ji)
            atomic = atomic + output(x, rbf, i, num_nodes=n_atoms)
        n_graphs = batch[K.NATOMS].shape[0]
        return atomic.new_zeros(n_graphs).index_add(0, batch[K.BATCH], atomic.squeeze(-1))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return energy_and_forces(self.energy, batch, training=self.training)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams.items())
