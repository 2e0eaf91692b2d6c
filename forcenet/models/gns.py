"""GNS: the encode-process-decode graph network of Sanchez-Gonzalez et al. (2020), for forces.

Sanchez-Gonzalez, Godwin, Pfaff, Ying, Leskovec, Battaglia, "Learning to Simulate Complex
Physics with Graph Networks", ICML 2020 (arXiv 2002.09405). The ForceNet paper uses it as a
force-centric baseline; its OC20 adaptation was never released, so this module follows the
original design of Sanchez-Gonzalez et al. with the per-atom force as the decoded quantity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, cast

import torch
from torch import Tensor, nn

from forcenet.data import keys as K
from forcenet.geometry import edge_vectors, smooth_cosine_cutoff
from forcenet.nn import GaussianBasis, check_choice, zero_linear_

Activation = Literal["relu", "swish", "gelu", "tanh"]
#: Edge encoder inputs: ``displacement`` = [v/c, |v|/c] (the paper's); ``radial`` adds
#: Gaussians of |v|; ``directional`` also adds the unit vector times each Gaussian.
EdgeFeatures = Literal["displacement", "radial", "directional"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}

#: Largest atomic number with an embedding row (OC20 uses Z <= 83).
MAX_ATOMIC_NUMBER = 100


def mlp(
    in_channels: int,
    hidden_channels: int,
    out_channels: int,
    *,
    layers: int,
    activation: Activation,
) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden_channels`` then a linear output layer.

    GNS convention: hidden layers are Linear + activation; the output layer has no activation.
    """
    mods: list[nn.Module] = []
    width = in_channels
    for _ in range(layers):
        mods += [nn.Linear(width, hidden_channels), _ACTIVATIONS[activation]()]
        width = hidden_channels
    mods.append(nn.Linear(width, out_channels))
    return nn.Sequential(*mods)


class InteractionNetwork(nn.Module):
    """One processor step: edge update from [e, h_src, h_dst], node update from [h, sum of e].

    Both updates are MLP + LayerNorm and are added to their input (residual). The node update
    reads the *updated* edge latents, summed at the centre ``i = edge_index[1]`` and, with
    ``batch_norm``, batch-normalised per channel.

    The first Linear of the edge MLP acts on a concatenation of three H-wide blocks; it is
    split into three Linears so the node parts are computed once per atom and then gathered
    per edge (same function as the concatenated form, fewer FLOPs since E >> N).
    """

    def __init__(
        self,
        *,
        hidden_channels: int,
        mlp_layers: int,
        activation: Activation,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        h = hidden_channels
        edge_mlp = mlp(3 * h, h, h, layers=mlp_layers, activation=activation)
        first: nn.Linear = edge_mlp[0]  # type: ignore[assignment]
        self.lin_edge = nn.Linear(h, h)  # the e-block of the first layer (carries the bias)
        self.lin_src = nn.Linear(h, h, bias=False)
        self.lin_dst = nn.Linear(h, h, bias=False)
        self._split_first(first)
        # a slice of a Sequential is a Sequential (keys kept); torch's stub says Sequential | Module
        self.edge_rest = cast(nn.Sequential, edge_mlp[1:])
        self.edge_norm = nn.LayerNorm(h)
        self.node_mlp = mlp(2 * h, h, h, layers=mlp_layers, activation=activation)
        self.node_norm = nn.LayerNorm(h)
        self.agg_norm: nn.Module = nn.BatchNorm1d(h) if batch_norm else nn.Identity()

    @torch.no_grad()
    def _split_first(self, first: nn.Linear) -> None:
        """Copy an initialised Linear(3H -> H) into the three H -> H blocks."""
        w_e, w_s, w_d = first.weight.chunk(3, dim=1)
        self.lin_edge.weight.copy_(w_e)
        self.lin_edge.bias.copy_(first.bias)
        self.lin_src.weight.copy_(w_s)
        self.lin_dst.weight.copy_(w_d)

    def reset_parameters(self) -> None:
        fresh = nn.Linear(3 * self.lin_edge.in_features, self.lin_edge.out_features)
        self._split_first(fresh.to(self.lin_edge.weight))
        for mod in (*self.edge_rest, self.edge_norm, *self.node_mlp, self.node_norm, self.agg_norm):
            if isinstance(mod, nn.Linear | nn.LayerNorm | nn.BatchNorm1d):
                mod.reset_parameters()

    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        src, dst = edge_index[0], edge_index[1]
        # first edge layer as per-node projections gathered per edge: [E, H]; index_select,
        # whose backward (index_add) is deterministic, unlike that of h[src] on CPU
        pre = (
            self.lin_edge(e)
            + self.lin_src(h).index_select(0, src)
            + self.lin_dst(h).index_select(0, dst)
        )
        e_new = e + self.edge_norm(self.edge_rest(pre))  # [E, H]
        agg = torch.zeros_like(h).index_add_(0, dst, e_new)  # sum over incoming edges: [N, H]
        agg = self.agg_norm(agg)
        h_new = h + self.node_norm(self.node_mlp(torch.cat([h, agg], dim=-1)))  # [N, H]
        return h_new, e_new


class GNS(nn.Module):
    """Graph Network-based Simulator (encode-process-decode) predicting per-atom forces.

    Idea: encode atoms and relative displacements into latent nodes and edges, refine them
    with M unshared interaction networks, and decode each node straight to a force vector;
    no symmetry is built in (raw Cartesian displacements), as in ForceNet.

    Sanchez-Gonzalez et al., "Learning to Simulate Complex Physics with Graph Networks",
    ICML 2020, arXiv 2002.09405.

    Hyperparameters (keyword-only; defaults are the paper's):

    * ``hidden_channels`` (128): width of every latent vector and MLP hidden layer.
    * ``num_interactions`` (10): number M of processor steps (unshared weights).
    * ``mlp_layers`` (2): hidden layers per MLP (encoders, processor, decoder).
    * ``cutoff`` (6.0 Å): graph radius; edge displacements and lengths are divided by it.
      It must match the neighbor-list cutoff the graphs were built with.
    * ``activation`` ("relu"): nonlinearity of all MLPs.
    * ``edge_features`` ("displacement"): what the edge encoder reads, see below.
    * ``num_radial`` (32): Gaussians of the distance for the ``radial`` and ``directional``
      edge features (centres evenly spaced on [0, cutoff], width = spacing).
    * ``batch_norm`` (False): BatchNorm instead of LayerNorm after the edge encoder, and
      BatchNorm of the summed edge latents before each node update (see below).
    * ``zero_init_decoder`` (False): start the decoder's last layer at zero, so the untrained
      model predicts F = 0 and training does not first have to unlearn random forces.

    Inputs: the node encoder embeds the atomic number (learned, Z <= 100) and applies an
    MLP + LayerNorm; the edge encoder reads ``[v / cutoff, |v| / cutoff]`` with
    ``v = pos[j] + cell_offsets @ cell - pos[i]`` (periodic images included) and applies an
    MLP + LayerNorm. The decoder is an MLP without LayerNorm to a 3-vector (eV/Å) per atom.

    The OC20 adaptation in the ForceNet paper was never published. The raw displacement
    changes by only ~1 % of its range when an atom moves 0.05 Å, which is the scale of the
    forces in relaxation data; ``radial`` appends ``num_radial`` Gaussians g_k(|v|) (times
    the cosine cutoff, so edges enter and leave smoothly) that resolve such changes, and
    ``directional`` also appends ``v/|v| * g_k(|v|)``, the pairwise radial-times-direction
    terms a force is naturally built from. Neither adds a symmetry constraint.

    LayerNorm normalises each edge across its channels, which keeps what all edges share:
    the encoded edges differ from each other by a few per cent, and the sum of ~24 of them
    at an atom is almost the same vector for every atom, so the part that carries the force
    is buried. ``batch_norm`` normalises each channel over the edges (encoder) and over the
    atoms (summed messages) of the batch instead, removing the shared part and rescaling
    what differs, as the BatchNorm in ForceNet's node update does; in eval mode it uses
    running statistics, so predictions stay per-structure (reports/recipe.md has the
    measurements).
    """

    energy_from_gradient = False

    def __init__(
        self,
        *,
        hidden_channels: int = 128,
        num_interactions: int = 10,
        mlp_layers: int = 2,
        cutoff: float = 6.0,
        activation: Activation = "relu",
        edge_features: EdgeFeatures = "displacement",
        num_radial: int = 32,
        batch_norm: bool = False,
        zero_init_decoder: bool = False,
    ) -> None:
        super().__init__()
        check_choice("edge_features", edge_features, EdgeFeatures)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive (Å), got {cutoff}")
        if hidden_channels < 1 or num_interactions < 0 or mlp_layers < 0:
            raise ValueError(
                "hidden_channels >= 1, num_interactions >= 0, mlp_layers >= 0 required"
            )
        h = hidden_channels
        self.cutoff = float(cutoff)
        self.edge_features = edge_features
        self.zero_init_decoder = bool(zero_init_decoder)
        edge_in = 4
        self.radial: GaussianBasis | None = None
        if edge_features != "displacement":
            self.radial = GaussianBasis(1, num_radial)  # on |v| / cutoff in [0, 1]
            edge_in += num_radial * (4 if edge_features == "directional" else 1)
        self.embedding = nn.Embedding(MAX_ATOMIC_NUMBER + 1, h)
        self.node_encoder = mlp(h, h, h, layers=mlp_layers, activation=activation)
        self.node_norm = nn.LayerNorm(h)
        self.edge_encoder = mlp(edge_in, h, h, layers=mlp_layers, activation=activation)
        self.edge_norm: nn.Module = nn.BatchNorm1d(h) if batch_norm else nn.LayerNorm(h)
        self.processor = nn.ModuleList(
            InteractionNetwork(
                hidden_channels=h,
                mlp_layers=mlp_layers,
                activation=activation,
                batch_norm=batch_norm,
            )
            for _ in range(num_interactions)
        )
        self.decoder = mlp(h, h, 3, layers=mlp_layers, activation=activation)
        self._init_decoder()

    def _init_decoder(self) -> None:
        if self.zero_init_decoder:
            zero_linear_(self.decoder[-1])  # type: ignore[arg-type]

    def reset_parameters(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear | nn.LayerNorm | nn.Embedding | nn.BatchNorm1d):
                mod.reset_parameters()
        # restores the 3H fan-in scale of the split edge Linear; nn.ModuleList is not generic
        # in torch's stubs, every item is an InteractionNetwork
        for block in cast("Iterable[InteractionNetwork]", self.processor):
            block.reset_parameters()
        self._init_decoder()

    def encode_edges(self, vec: Tensor) -> Tensor:
        """Edge encoder inputs [E, F] from edge vectors ``vec`` [E, 3] in Å."""
        scaled = vec / self.cutoff
        dist = scaled.norm(dim=-1, keepdim=True)  # [E, 1], |v| / cutoff
        parts = [scaled, dist]
        if self.radial is not None:
            rbf = self.radial(dist) * smooth_cosine_cutoff(dist, 1.0)  # [E, K]
            parts.append(rbf)
            if self.edge_features == "directional":
                unit = scaled / dist.clamp_min(1e-9)  # [E, 3]; no two atoms coincide
                parts.append((unit[:, :, None] * rbf[:, None, :]).flatten(1))  # [E, 3K]
        return torch.cat(parts, dim=-1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"forces": [N, 3]}`` in eV/Å for a batch from :func:`forcenet.data.batch.collate`."""
        z = batch[K.ATOMIC_NUMBERS]
        if z.numel() and (int(z.min()) < 1 or int(z.max()) > MAX_ATOMIC_NUMBER):
            raise ValueError(f"GNS embeds atomic numbers 1..{MAX_ATOMIC_NUMBER}, got {z.unique()}")
        edge_index = batch[K.EDGE_INDEX]
        vec = edge_vectors(
            batch[K.POS], batch[K.CELL], batch[K.BATCH], edge_index, batch[K.CELL_OFFSETS]
        )  # [E, 3], centre i -> neighbor image j
        edge_in = self.encode_edges(vec.to(self.embedding.weight.dtype))  # [E, F]
        h = self.node_norm(self.node_encoder(self.embedding(z)))  # [N, H]
        e = self.edge_norm(self.edge_encoder(edge_in))  # [E, H]
        for block in self.processor:
            h, e = block(h, e, edge_index)
        return {K.OUT_FORCES: self.decoder(h)}  # [N, 3]
