"""ForceNet (Hu et al. 2021, arXiv:2103.01436): a GNN that predicts per-atom forces directly.

Layout: per-forward edge features (radius-aware distances and a direction basis, shared by
all blocks) -> atom embedding -> residual interaction blocks with a conditional filter
(:mod:`forcenet.models.forcenet_blocks`) -> Linear + activation -> force decoder (and an
optional energy head).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.geometry import cosine_envelope, edge_vectors
from forcenet.models import elements
from forcenet.models.forcenet_blocks import AblationName, InteractionBlock, interaction_block
from forcenet.nn import (
    ActivationName,
    DistanceEdgeBasis,
    RealSphericalHarmonics,
    ScalarBasis,
    ScalarBasisName,
    ScalarEdgeBasis,
    SinusoidalBasis,
    SphericalConcatBasis,
    SphericalOuterBasis,
    SphParity,
    UnitInterval,
    check_choice,
    energy_and_forces,
    scalar_basis,
    xavier_linears_,
    zero_linear_,
)
from forcenet.nn import activation as make_activation

FeatName = Literal["full", "simple"]
BasisName = Literal[
    "powersine",
    "powercosine",
    "fouriersine",
    "gauss",
    "linact",
    "raw",
    "sphallmul",
    "sphallcat",
    "sphallm40",
    "sphallnosine",
    "sphsinemul",
    "sphsinecat",
    "sphsinem40",
    "sphsinenosine",
    "sphcosinemul",
    "sphcosinecat",
    "sphcosinem40",
    "sphcosinenosine",
]
DecoderType = Literal["mlp", "linear"]
ForceMode = Literal["direct", "gradient"]

#: Lower clamp of the (cutoff-scaled) distance features, as in the reference.
MIN_SCALED_DISTANCE = 1e-3

#: The modules :func:`edge_basis` builds; each has an ``out_features: int``.
EdgeBasis = DistanceEdgeBasis | ScalarEdgeBasis | SphericalConcatBasis | SphericalOuterBasis


# ----------------------------------------------------------------------------- edge features


class RadiusDistances(nn.Module):
    """The 4 radius-aware distance features [E, 4], scaled by 1/cutoff, clamped >= 1e-3:
    d, d - r(Z_j), d - r(Z_i), d - r(Z_j) - r(Z_i) (r = atomic radius in Å)."""

    out_features = 4
    radii: Tensor  # [101] Å, a buffer

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        radii = torch.from_numpy(elements.atomic_radii()).nan_to_num(0.0)  # [101] Å
        self.register_buffer("radii", radii.to(torch.get_default_dtype()), persistent=False)
        self.cutoff = cutoff

    def forward(self, d: Tensor, z: Tensor, j: Tensor, i: Tensor) -> Tensor:
        r = self.radii[z]  # [N]
        rj, ri = r[j], r[i]  # [E]
        feats = torch.stack([d, d - rj, d - ri, d - rj - ri], dim=-1)  # [E, 4]
        return (feats / self.cutoff).clamp(min=MIN_SCALED_DISTANCE)


class PlainDistance(nn.Module):
    """Only d / cutoff (clamped >= 1e-3) as [E, 1]: the ``nodistlist`` ablation."""

    out_features = 1

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff

    def forward(self, d: Tensor, z: Tensor, j: Tensor, i: Tensor) -> Tensor:
        return (d / self.cutoff).clamp(min=MIN_SCALED_DISTANCE)[:, None]


def edge_basis(
    basis: BasisName,
    *,
    num_dists: int,
    only_dist: bool,
    num_freqs: int,
    max_n: int,
    act: ActivationName,
) -> EdgeBasis:
    """The edge-basis module (computed once per forward); ``out_features`` = its width B."""
    if only_dist:  # no direction: spherical bases fall back to powersine (reference)
        return DistanceEdgeBasis(scalar_basis(_scalar_kind(basis), num_dists, num_freqs, act))
    if not basis.startswith("sph"):
        direction_map = UnitInterval() if basis == "gauss" else nn.Identity()
        kind = _scalar_kind(basis)
        return ScalarEdgeBasis(scalar_basis(kind, 3 + num_dists, num_freqs, act), direction_map)
    rest = basis.removeprefix("sph")
    parities: tuple[SphParity, ...] = ("all", "sine", "cosine")
    parity = next(p for p in parities if rest.startswith(p))
    sph = RealSphericalHarmonics(max_n, parity)
    combine = rest.removeprefix(parity)
    sine = SinusoidalBasis(num_dists, num_freqs)
    if combine == "cat":
        return SphericalConcatBasis(sph, sine)
    if combine == "nosine":
        return SphericalOuterBasis(sph, nn.Identity(), num_dists)
    width = num_dists if combine == "mul" else 40
    return SphericalOuterBasis(sph, nn.Sequential(sine, nn.Linear(sine.out_features, width)), width)


def _scalar_kind(basis: BasisName) -> ScalarBasisName:
    """The scalar basis of ``basis``: itself, or powersine for a spherical one (reference)."""
    # the non-"sph" names are exactly the scalar ones, a narrowing Literal cannot express
    return "powersine" if basis.startswith("sph") else cast(ScalarBasisName, basis)


# ----------------------------------------------------------------------------- atom embeddings


class ContinuousAtomEmbedding(nn.Module):
    """h0 = Linear(basis(scaled 9 element features of Z)) -> [N, H] (``feat="full"``)."""

    table: Tensor  # [101, 9] scaled element features, a buffer

    def __init__(self, hidden_channels: int, basis: ScalarBasis) -> None:
        super().__init__()
        table = torch.from_numpy(elements.scaled_features()).nan_to_num(0.0)  # [101, 9]
        self.register_buffer("table", table.to(torch.get_default_dtype()), persistent=False)
        self.basis = basis
        self.lin = nn.Linear(basis.out_features, hidden_channels)

    def forward(self, z: Tensor) -> Tensor:
        return self.lin(self.basis(self.table[z]))


class SimpleAtomEmbedding(nn.Embedding):
    """A learnable vector per element, Z = 1..100 (``feat="simple"``)."""

    def __init__(self, hidden_channels: int) -> None:
        super().__init__(elements.MAX_Z, hidden_channels)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z - 1)


# ----------------------------------------------------------------------------- heads


class EnergyHead(nn.Linear):
    """Energy per graph = Linear(D -> 1)(sum over the graph's atoms of h) -> [G] (eV)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 1)

    # A Linear (its parameters keep the checkpoint keys) that pools first: another signature.
    def forward(self, h: Tensor, batch: Tensor, num_graphs: int) -> Tensor:  # type: ignore[override]
        pooled = h.new_zeros(num_graphs, h.shape[1]).index_add(0, batch, h)  # [G, D]
        return super().forward(pooled).squeeze(-1)


def force_decoder(kind: DecoderType, channels: int, act: ActivationName) -> nn.Sequential:
    """``mlp``: Linear(D, D)-BatchNorm-act-Linear(D, 3); ``linear``: Linear(D, 3)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(channels, 3))
    return nn.Sequential(
        nn.Linear(channels, channels),
        nn.BatchNorm1d(channels),
        make_activation(act),
        nn.Linear(channels, 3),
    )


# ----------------------------------------------------------------------------- model


class ForceNet(nn.Module):
    """ForceNet (Hu et al. 2021, "ForceNet: A Graph Neural Network for Large-Scale Quantum
    Calculations", arXiv:2103.01436).

    Idea: drop hard physical constraints (energy conservation, rotation covariance) and
    predict each atom's force directly with an expressive message-passing network whose
    per-edge filter is conditioned on both endpoint embeddings and rich edge features;
    approximate rotation covariance is learned through rotation augmentation.

    Hyperparameters (keyword-only; paper/reference defaults):

    * ``hidden_channels`` (512): width H of atom embeddings and blocks.
    * ``num_interactions`` (5): number of residual interaction blocks (not weight-shared).
    * ``cutoff`` (6.0 Å): scales the distance features and sets the edge weight
      cos(pi d / (2 cutoff)). The graph itself (radius + max neighbors) comes from the batch.
    * ``feat`` ("full"): atom input; "full" = 9 min-max-scaled element properties through the
      basis (powersine when the edge basis is spherical) and Linear(9F -> H); "simple" =
      a learnable Embedding per element (Z = 1..100).
    * ``num_freqs`` (50): frequencies/centres F per scalar fed to a basis.
    * ``max_n`` (3): spherical harmonics of degree < max_n (3 -> degrees 0, 1, 2; 9 functions).
    * ``basis`` ("sphallmul"): edge basis; "sphallmul" = SH(direction) outer
      Linear(powersine(4 distance features) -> 4), 36 features. Also powersine, powercosine,
      fouriersine, gauss, linact, raw and sph{all,sine,cosine}{mul,cat,m40,nosine}.
    * ``depth_mlp_edge`` (2): filter MLP Linear(3H -> H) + depth x (act, Linear(H -> H));
      0 = Linear + BatchNorm.
    * ``depth_mlp_node`` (1): node MLP Linear(H -> H) + depth x (BatchNorm, act, Linear);
      0 = Linear + BatchNorm.
    * ``activation`` ("swish"): activation in the basis (linact), blocks and after the last
      block; see :data:`forcenet.nn.ActivationName`.
    * ``decoder_hidden_channels`` (512): width D after the blocks (Linear(H -> D) + act).
    * ``decoder_type`` ("mlp"): force decoder Linear(D, D)-BatchNorm-act-Linear(D, 3), or
      "linear" = Linear(D, 3).
    * ``decoder_activation`` ("swish"): activation inside the mlp decoder.
    * ``ablation`` ("none"): the reference ablations: nofilter, nocond, nodistlist,
      onlydist, nodelinear (node MLP depth 0), edgelinear (edge MLP depth 0), noself.
    * ``energy_head`` (False): also predict a per-graph energy (sum-pool, Linear(D -> 1));
      the reference trains ForceNet force-only.
    * ``forces`` ("direct"): "direct" = the force decoder's output (the paper);
      "gradient" = -dE/dpos of the energy head (needs ``energy_head``; the decoder is kept
      but unused), a conservative ForceNet, e.g. for the conservative fine-tune of a
      direct-force training (``TrainConfig.conservative_finetune_steps``; beyond the paper,
      as Bigi et al. 2025, arXiv:2412.11569, recommend). Same parameters in both modes.

    Initialisation options (no effect on the architecture; the defaults are the reference's).
    Both shorten the "predict zero" plateau of short trainings, see ``reports/recipe.md``:

    * ``zero_init_decoder`` (False): start the decoder's last Linear(D -> 3) at zero, so the
      untrained model predicts F = 0 instead of O(1) random forces that training first has
      to unlearn.
    * ``basis_init_gain`` (1.0): multiply the initial weights of every block's edge-basis
      projection. At the reference initialisation the direction-dependent part of the
      filter's input is about 10x smaller than the endpoint-embedding part, and the force
      signal is carried by the direction.

    ``forward(batch)`` returns ``{"forces": [N, 3] eV/Å}`` plus ``"energy"`` [G] (eV) when
    ``energy_head``. Forces are direct outputs, not energy gradients, unless ``forces`` is
    "gradient": then the instance's ``energy_from_gradient`` is True (the class default
    stays False).
    """

    energy_from_gradient = False
    supported: Tensor  # bool [101], a buffer: the elements this configuration has data for

    def __init__(
        self,
        *,
        hidden_channels: int = 512,
        num_interactions: int = 5,
        cutoff: float = 6.0,
        feat: FeatName = "full",
        num_freqs: int = 50,
        max_n: int = 3,
        basis: BasisName = "sphallmul",
        depth_mlp_edge: int = 2,
        depth_mlp_node: int = 1,
        activation: ActivationName = "swish",
        decoder_hidden_channels: int = 512,
        decoder_type: DecoderType = "mlp",
        decoder_activation: ActivationName = "swish",
        ablation: AblationName = "none",
        energy_head: bool = False,
        forces: ForceMode = "direct",
        zero_init_decoder: bool = False,
        basis_init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        _check_args(locals())
        self.zero_init_decoder = bool(zero_init_decoder)
        self.basis_init_gain = float(basis_init_gain)
        self.cutoff = float(cutoff)
        self.energy_from_gradient = forces == "gradient"
        depth_mlp_edge = 0 if ablation == "edgelinear" else depth_mlp_edge
        depth_mlp_node = 0 if ablation == "nodelinear" else depth_mlp_node
        hidden = hidden_channels

        self.distances = (PlainDistance if ablation == "nodistlist" else RadiusDistances)(cutoff)
        self.edge_basis = edge_basis(
            basis,
            num_dists=self.distances.out_features,
            only_dist=ablation == "onlydist",
            num_freqs=num_freqs,
            max_n=max_n,
            act=activation,
        )
        if feat == "full":
            atom_kind = _scalar_kind(basis)
            atom_basis = scalar_basis(atom_kind, len(elements.FEATURE_NAMES), num_freqs, activation)
            self.atom_embedding: nn.Module = ContinuousAtomEmbedding(hidden, atom_basis)
        else:
            self.atom_embedding = SimpleAtomEmbedding(hidden)
        self.register_buffer("supported", _supported(feat, ablation), persistent=False)

        self.interactions = nn.ModuleList(
            _block(
                self.energy_from_gradient,
                hidden=hidden,
                basis_features=self.edge_basis.out_features,
                depth_mlp_edge=depth_mlp_edge,
                depth_mlp_node=depth_mlp_node,
                act=activation,
                ablation=ablation,
            )
            for _ in range(num_interactions)
        )
        self.lin_out = nn.Linear(hidden, decoder_hidden_channels)
        self.act = make_activation(activation)
        self.decoder = force_decoder(decoder_type, decoder_hidden_channels, decoder_activation)
        self.energy_head = EnergyHead(decoder_hidden_channels) if energy_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: Xavier-uniform/zero bias in blocks and decoder, PyTorch
        defaults for the atom embedding, edge basis, Linear(H -> D) and energy head; then
        the ``basis_init_gain`` and ``zero_init_decoder`` options."""
        for part in (self.atom_embedding, self.edge_basis, self.lin_out, self.energy_head):
            for m in part.modules() if part is not None else ():
                if isinstance(m, nn.Linear | nn.Embedding):
                    m.reset_parameters()
        # nn.ModuleList is not generic: its items are typed Module
        blocks = cast(list[InteractionBlock], list(self.interactions))
        for block in blocks:
            block.reset_parameters()
        xavier_linears_(self.decoder)
        for m in self.decoder.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()
        with torch.no_grad():
            for block in blocks:
                block.filter.lin_basis.weight.mul_(self.basis_init_gain)
        if self.zero_init_decoder:
            last = self.decoder[-1]
            assert isinstance(last, nn.Linear)  # force_decoder ends in Linear(D, 3)
            zero_linear_(last)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.energy_from_gradient:  # forces = -dE/dpos of the energy head
            return energy_and_forces(self._energy, batch, training=self.training)
        h = self._features(batch, batch[K.POS])  # [N, D]
        out = {K.OUT_FORCES: self.decoder(h)}  # [N, 3] eV/Å
        if self.energy_head is not None:
            out[K.OUT_ENERGY] = self.energy_head(h, batch[K.BATCH], batch[K.NATOMS].shape[0])
        return out

    def _energy(self, batch: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Energy per graph [G] (eV) at positions ``pos`` [N, 3] (``forces="gradient"``)."""
        assert self.energy_head is not None  # checked at construction
        h = self._features(batch, pos)  # [N, D]
        return self.energy_head(h, batch[K.BATCH], batch[K.NATOMS].shape[0])

    def _features(self, batch: dict[str, Tensor], pos: Tensor) -> Tensor:
        """Atom features [N, D] after the blocks and Linear(H -> D) + act, at ``pos``."""
        z = batch[K.ATOMIC_NUMBERS]  # [N]
        elements.check_elements(z, self.supported, "ForceNet")
        dtype = self.lin_out.weight.dtype
        edge_index = batch[K.EDGE_INDEX]  # [2, E]: row 0 neighbor j, row 1 centre i
        j, i = edge_index[0], edge_index[1]
        vec = edge_vectors(
            pos.to(dtype),
            batch[K.CELL].to(dtype),
            batch[K.BATCH],
            edge_index,
            batch[K.CELL_OFFSETS],
        )  # [E, 3], Å
        d = vec.norm(dim=-1)  # [E]
        u = vec / d[:, None]  # [E, 3] unit vectors from i to j
        basis = self.edge_basis(u, self.distances(d, z, j, i))  # [E, B], shared by all blocks
        envelope = cosine_envelope(d, self.cutoff)[:, None]  # [E, 1]

        h = self.atom_embedding(z)  # [N, H]
        for block in self.interactions:
            h = h + block(h, basis, envelope, j, i)
        return self.act(self.lin_out(h))  # [N, D]


class TwiceDifferentiableBlock(InteractionBlock):
    """An interaction block that never takes the fused CPU edge pass, whose hand-written
    backward is once-differentiable: gradient forces are trained (and their Jacobian
    measured) by double backward. The same function and parameters otherwise."""

    def _fused_tail(self, h: Tensor) -> list[Tensor] | None:
        return None


def _block(twice_differentiable: bool, **kwargs: Any) -> InteractionBlock:
    """:func:`interaction_block` with ``kwargs``; as a :class:`TwiceDifferentiableBlock`
    for gradient forces."""
    block = interaction_block(**kwargs)
    if not twice_differentiable:
        return block
    # re-wrapping initialises once more: on a side RNG, so both force modes draw the same
    # weights from the same seed (ForceNet.reset_parameters re-initialises them anyway)
    with torch.random.fork_rng(devices=[]):
        return TwiceDifferentiableBlock(block.filter, block.message, block.node_mlp)


def _supported(feat: FeatName, ablation: AblationName) -> Tensor:
    """Bool [101]: elements this configuration has data for (Z = 0 never)."""
    ok = np.arange(elements.MAX_Z + 1) > 0
    if feat == "full":
        ok &= elements.feature_support()
    if ablation != "nodistlist":
        ok &= elements.radius_support()
    return torch.from_numpy(ok)


def _check_args(args: dict) -> None:
    """Clear ValueErrors for out-of-range or unknown hyperparameters."""
    for name in (
        "hidden_channels",
        "num_interactions",
        "num_freqs",
        "max_n",
        "decoder_hidden_channels",
    ):
        if not isinstance(args[name], int) or args[name] < 1:
            raise ValueError(f"ForceNet: {name} must be a positive integer, got {args[name]!r}")
    for name in ("depth_mlp_edge", "depth_mlp_node"):
        if not isinstance(args[name], int) or args[name] < 0:
            raise ValueError(f"ForceNet: {name} must be an integer >= 0, got {args[name]!r}")
    if not (isinstance(args["basis_init_gain"], int | float) and args["basis_init_gain"] > 0):
        raise ValueError(f"ForceNet: basis_init_gain must be > 0, got {args['basis_init_gain']!r}")
    if args["forces"] == "gradient" and not args["energy_head"]:
        raise ValueError("ForceNet: forces='gradient' (-dE/dpos) needs energy_head=True")
    if not float(args["cutoff"]) > 0:
        raise ValueError(f"ForceNet: cutoff must be > 0 Å, got {args['cutoff']!r}")
    choices = {
        "feat": FeatName,
        "basis": BasisName,
        "activation": ActivationName,
        "decoder_type": DecoderType,
        "decoder_activation": ActivationName,
        "ablation": AblationName,
        "forces": ForceMode,
    }
    for name, options in choices.items():
        check_choice(f"ForceNet: {name}", args[name], options)
