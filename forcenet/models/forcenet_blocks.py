"""ForceNet's interaction block (:class:`forcenet.models.forcenet.ForceNet`): a
conditional filter W_ij on the edges, a filtered message summed at each centre, a node
MLP; the variants the reference ablations select (``nocond``, ``nofilter``, ``noself``).

Speed: the filter MLP's first layer acts on [e_ij, h_j, h_i] (3H inputs per edge). We keep
that Linear(3H -> H) as one parameter (same parameters and initialisation as the reference)
but apply it in three slices: the h_j and h_i slices once per *node* and then gathered, and
the e_ij slice fused with the preceding basis Linear into one (B -> H) map. This is the same
function as the concatenated form, at a fraction of the per-edge cost. On CPU the whole
edge pass can run fused and chunked (:mod:`forcenet.models.forcenet_kernel`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forcenet.models.forcenet_kernel import FusedFilterMessage
from forcenet.nn import (
    ActivationName,
    act_linear_stack,
    gather_mul_scatter,
    norm_act_linear_stack,
    xavier_linears_,
)

#: ForceNet's ``ablation`` hyperparameter: the reference ablations. This module builds the
#: block variants of ``nocond``, ``nofilter`` and ``noself``; the model reads the others.
AblationName = Literal[
    "none", "nofilter", "nocond", "nodistlist", "onlydist", "nodelinear", "edgelinear", "noself"
]


def _edge_tail(hidden: int, depth: int, act: ActivationName) -> nn.Sequential:
    """Layers after the filter's first Linear: depth x (act, Linear), or BatchNorm if 0."""
    return nn.Sequential(*(act_linear_stack(hidden, depth, act) or [nn.BatchNorm1d(hidden)]))


class ConditionalFilter(nn.Module):
    """W_ij = MLP_edge([Linear_basis(b_ij), h_j, h_i]) * w(d_ij) -> [E, H].

    The first Linear(3H -> H) is applied slice by slice (see the module docstring).
    """

    #: Node-embedding slices of the first Linear's input (h_j, h_i).
    node_slices = 2

    def __init__(self, hidden: int, basis_features: int, depth: int, act: ActivationName):
        super().__init__()
        self.hidden = hidden
        self.lin_basis = nn.Linear(basis_features, hidden)
        self.first = nn.Linear((1 + self.node_slices) * hidden, hidden)
        self.tail = _edge_tail(hidden, depth, act)

    def node_terms(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w_fused [H, B], node_j [N, H], node_i [N, H]): the first Linear is
        ``node_j[j] + node_i[i] + basis @ w_fused^T`` per edge (bias inside node_j)."""
        w_e, w_j, w_i = self.first.weight.split(self.hidden, dim=1)  # each [H, H]
        # Linear_basis then the e-slice is one linear map B -> H: fuse the weights.
        w_fused = w_e @ self.lin_basis.weight  # [H, B]
        b_fused = torch.addmv(self.first.bias, w_e, self.lin_basis.bias)  # [H]
        # The node slices once per node (not per edge); the bias rides on the j slice.
        node_j = torch.addmm(b_fused, h, w_j.t())  # [N, H]
        node_i = h @ w_i.t()  # [N, H]
        return w_fused, node_j, node_i

    def fused_tail(self) -> list[Tensor] | None:
        """[weight, bias] * depth of a (SiLU, Linear) * depth tail: the form the fused CPU
        edge pass implements; None for any other tail (activation, BatchNorm)."""
        layers = list(self.tail)
        if not layers or len(layers) % 2:
            return None
        params: list[Tensor] = []
        for act, lin in zip(layers[0::2], layers[1::2], strict=True):
            if type(act) is not nn.SiLU or not (
                type(lin) is nn.Linear and isinstance(lin, nn.Linear)
            ):
                return None
            params += [lin.weight, lin.bias]
        return params

    def first_layer(self, basis: Tensor, h: Tensor, j: Tensor, i: Tensor) -> Tensor:
        w_fused, node_j, node_i = self.node_terms(h)
        # index_select (not x[idx]): its backward is index_add, much faster on CPU
        out = node_j.index_select(0, j).add_(node_i.index_select(0, i))  # [E, H]
        return torch.addmm(out, basis, w_fused.t())

    def forward(self, basis: Tensor, envelope: Tensor, h: Tensor, j: Tensor, i: Tensor) -> Tensor:
        return self.tail(self.first_layer(basis, h, j, i)).mul_(envelope)  # [E, H]


class EdgeOnlyFilter(ConditionalFilter):
    """W_ij = MLP_edge(Linear_basis(b_ij)) * w(d_ij): the ``nocond`` ablation."""

    node_slices = 0

    def first_layer(self, basis: Tensor, h: Tensor, j: Tensor, i: Tensor) -> Tensor:
        w = self.first.weight @ self.lin_basis.weight  # [H, B]
        b = torch.addmv(self.first.bias, self.first.weight, self.lin_basis.bias)
        return F.linear(basis, w, b)


#: Use the fused, chunked edge pass (:class:`forcenet.models.forcenet_kernel.FusedFilterMessage`)
#: on CPU when it applies.
FUSED_EDGE_PASS = True


class FilteredMessage(nn.Module):
    """sum_j x_j * W_ij + c * x_i with x = Linear(h): the reference message and self term."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)
        self.center = nn.Parameter(torch.empty(1, hidden))

    def add_self_term(self, agg: Tensor, x: Tensor) -> Tensor:
        return torch.addcmul(agg, self.center, x)  # agg + c * x

    def forward(self, h: Tensor, w: Tensor, j: Tensor, i: Tensor) -> Tensor:
        x = self.lin(h)  # [N, H]
        agg = gather_mul_scatter(x, w, j, i, x.shape[0])  # sum_j x_j * W_ij -> [N, H]
        return self.add_self_term(agg, x)


class NoSelfMessage(FilteredMessage):
    """sum_j x_j * W_ij without a self term (``noself``)."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        del self.center

    def add_self_term(self, agg: Tensor, x: Tensor) -> Tensor:
        return agg


class FilterOnlyMessage(nn.Module):
    """sum_j W_ij + c (``nofilter``: the filter itself is the message)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.center = nn.Parameter(torch.empty(1, hidden))

    def forward(self, h: Tensor, w: Tensor, j: Tensor, i: Tensor) -> Tensor:
        return torch.zeros_like(h).index_add_(0, i, w) + self.center


class InteractionBlock(nn.Module):
    """One ForceNet block; returns the update added to h by the residual connection."""

    def __init__(
        self,
        filter_: ConditionalFilter,
        message: FilteredMessage | FilterOnlyMessage,
        node_mlp: nn.Sequential,
    ) -> None:
        super().__init__()
        self.filter, self.message, self.node_mlp = filter_, message, node_mlp
        self.reset_parameters()

    def reset_parameters(self) -> None:
        xavier_linears_(self)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()
        for name, p in self.message.named_parameters():
            if name == "center":
                nn.init.xavier_uniform_(p)

    def forward(self, h: Tensor, basis: Tensor, envelope: Tensor, j: Tensor, i: Tensor) -> Tensor:
        tail = self._fused_tail(h)
        if tail is not None:  # same function, one cache-friendly pass over the edges
            message = self.message
            assert isinstance(message, FilteredMessage)  # checked by _fused_tail
            w_fused, node_j, node_i = self.filter.node_terms(h)
            x = message.lin(h)  # [N, H]
            agg = FusedFilterMessage.apply(basis, envelope, node_j, node_i, w_fused, x, j, i, *tail)
            return self.node_mlp(message.add_self_term(agg, x))
        w = self.filter(basis, envelope, h, j, i)  # [E, H]
        return self.node_mlp(self.message(h, w, j, i))  # [N, H]

    def _fused_tail(self, h: Tensor) -> list[Tensor] | None:
        """The tail parameters when the fused CPU pass applies (conditional filter with a
        SiLU tail, filtered message, CPU, no autocast), else None."""
        if not (
            FUSED_EDGE_PASS
            and h.device.type == "cpu"
            and type(self.filter) is ConditionalFilter
            and isinstance(self.message, FilteredMessage)
            and not torch.is_autocast_enabled("cpu")
        ):
            return None
        return self.filter.fused_tail()


def interaction_block(
    *,
    hidden: int,
    basis_features: int,
    depth_mlp_edge: int,
    depth_mlp_node: int,
    act: ActivationName,
    ablation: AblationName,
) -> InteractionBlock:
    """One block with the filter and message variant that ``ablation`` selects."""
    filter_cls = EdgeOnlyFilter if ablation == "nocond" else ConditionalFilter
    messages: dict[str, type[FilteredMessage | FilterOnlyMessage]] = {
        "nofilter": FilterOnlyMessage,
        "noself": NoSelfMessage,
    }
    message_cls = messages.get(ablation, FilteredMessage)
    node_tail = norm_act_linear_stack(hidden, depth_mlp_node, act) or [nn.BatchNorm1d(hidden)]
    return InteractionBlock(
        filter_cls(hidden, basis_features, depth_mlp_edge, act),
        message_cls(hidden),
        nn.Sequential(nn.Linear(hidden, hidden), *node_tail),
    )
