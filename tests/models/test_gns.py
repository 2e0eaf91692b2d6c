"""GNS-specific behaviour; the shared physics contract is in test_contract.py."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import build_tiny, make_batch
from torch import nn

from forcenet.data import keys as K
from forcenet.models.gns import GNS, InteractionNetwork, mlp


def _two_atoms(z0: int, z1: int, *, x1: float = 2.0) -> dict:
    """Two atoms in free space joined by the single directed edge 0 -> 1 (centre 1)."""
    return {
        K.POS: torch.tensor([[0.0, 0.0, 0.0], [x1, 0.3, -0.2]]),
        K.CELL: torch.eye(3)[None] * 20.0,
        K.PBC: torch.zeros(1, 3, dtype=torch.bool),
        K.ATOMIC_NUMBERS: torch.tensor([z0, z1]),
        K.EDGE_INDEX: torch.tensor([[0], [1]]),
        K.CELL_OFFSETS: torch.zeros(1, 3),
        K.BATCH: torch.zeros(2, dtype=torch.long),
        K.NATOMS: torch.tensor([2]),
    }


def test_defaults_are_the_paper_hyperparameters() -> None:
    params = inspect.signature(GNS.__init__).parameters
    defaults = {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert defaults == {
        "hidden_channels": 128,
        "num_interactions": 10,
        "mlp_layers": 2,
        "cutoff": 6.0,
        "activation": "relu",
        "edge_features": "displacement",
        "num_radial": 32,
        "batch_norm": False,
        "zero_init_decoder": False,
    }
    assert GNS.energy_from_gradient is False


def test_parameter_count_matches_the_architecture() -> None:
    """Embedding, 2 encoders, M processor steps (edge + node MLP, 2 LayerNorms), decoder."""
    h, m = 8, 3

    def mlp_params(i: int, o: int) -> int:  # 2 hidden layers of width h
        return (i * h + h) + (h * h + h) + (h * o + o)

    expected = (
        101 * h
        + mlp_params(h, h)
        + 2 * h  # node encoder + LayerNorm
        + mlp_params(4, h)
        + 2 * h  # edge encoder + LayerNorm
        + m * (mlp_params(3 * h, h) + mlp_params(2 * h, h) + 4 * h)
        + mlp_params(h, 3)  # decoder, no LayerNorm
    )
    model = GNS(hidden_channels=h, num_interactions=m)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.processor) == m
    assert not any(isinstance(mod, nn.LayerNorm) for mod in model.decoder)


def test_processor_steps_do_not_share_weights() -> None:
    model = GNS(hidden_channels=8, num_interactions=2)
    a, b = model.processor
    assert a.lin_edge.weight.data_ptr() != b.lin_edge.weight.data_ptr()
    assert not torch.equal(a.lin_edge.weight, b.lin_edge.weight)


def test_split_edge_linear_equals_the_concatenated_layer() -> None:
    """lin_edge(e) + lin_src(h)[src] + lin_dst(h)[dst] == MLP([e, h_src, h_dst]) (first layer)."""
    torch.manual_seed(0)
    h = 6
    block = InteractionNetwork(hidden_channels=h, mlp_layers=2, activation="relu")
    full = nn.Linear(3 * h, h)
    with torch.no_grad():
        full.weight.copy_(
            torch.cat([block.lin_edge.weight, block.lin_src.weight, block.lin_dst.weight], 1)
        )
        full.bias.copy_(block.lin_edge.bias)
    nodes, edges = torch.randn(5, h), torch.randn(7, h)
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 0, 2], [1, 2, 3, 4, 0, 3, 1]])
    src, dst = edge_index
    split = block.lin_edge(edges) + block.lin_src(nodes)[src] + block.lin_dst(nodes)[dst]
    concat = full(torch.cat([edges, nodes[src], nodes[dst]], dim=-1))
    torch.testing.assert_close(split, concat)


def test_split_keeps_the_fan_in_of_the_concatenated_layer() -> None:
    """Initialised as one Linear(3H -> H): weights bounded by 1/sqrt(3H), not 1/sqrt(H)."""
    torch.manual_seed(0)
    h = 64
    block = InteractionNetwork(hidden_channels=h, mlp_layers=2, activation="relu")
    for lin in (block.lin_edge, block.lin_src, block.lin_dst):
        assert lin.weight.abs().max() <= (3 * h) ** -0.5
        assert lin.weight.abs().max() > 0.9 * (3 * h) ** -0.5
    block.lin_edge.weight.data.zero_()
    block.reset_parameters()
    assert block.lin_edge.weight.abs().max() <= (3 * h) ** -0.5
    assert block.lin_edge.weight.abs().max() > 0


def test_messages_flow_from_neighbor_to_centre() -> None:
    """Edge 0 -> 1: atom 1 (centre) sees atom 0; atom 0 receives nothing."""
    torch.manual_seed(0)
    model = GNS(hidden_channels=8, num_interactions=2, cutoff=5.0).eval()
    ref = model(_two_atoms(8, 29))[K.OUT_FORCES]
    other_neighbor = model(_two_atoms(1, 29))[K.OUT_FORCES]
    other_centre = model(_two_atoms(8, 78))[K.OUT_FORCES]
    moved = model(_two_atoms(8, 29, x1=2.5))[K.OUT_FORCES]
    assert not torch.allclose(other_neighbor[1], ref[1])  # the centre hears its neighbor
    torch.testing.assert_close(other_centre[0], ref[0])  # the neighbor hears nothing
    torch.testing.assert_close(moved[0], ref[0])
    assert not torch.allclose(moved[1], ref[1])  # and the centre sees the displacement


def test_edge_input_uses_the_periodic_image(slabs) -> None:
    """Changing a cell offset (another image of the same neighbor) changes the output."""
    model = build_tiny("gns")
    batch = make_batch(slabs[:1])
    offsets = batch[K.CELL_OFFSETS].clone()
    offsets[0] += torch.tensor([1.0, 0.0, 0.0])
    out = model(dict(batch, cell_offsets=offsets))[K.OUT_FORCES]
    ref = model(batch)[K.OUT_FORCES]
    centre = int(batch[K.EDGE_INDEX][1, 0])
    assert not torch.allclose(out[centre], ref[centre])


def test_residual_stack_with_zero_interactions_still_runs(slabs) -> None:
    model = GNS(hidden_channels=8, num_interactions=0, cutoff=4.5)
    out = model(make_batch(slabs[:2]))[K.OUT_FORCES]
    assert out.shape == (sum(len(s[K.ATOMIC_NUMBERS]) for s in slabs[:2]), 3)
    # without message passing an atom sees only its element: same element, same force
    z = np.concatenate([s[K.ATOMIC_NUMBERS] for s in slabs[:2]])
    same = np.flatnonzero(z == z[0])
    torch.testing.assert_close(out[same], out[same[:1]].expand(len(same), 3))


def test_reset_parameters_redraws_weights() -> None:
    torch.manual_seed(0)
    model = GNS(hidden_channels=8, num_interactions=1)
    before = [p.detach().clone() for p in model.parameters()]
    model.reset_parameters()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    weights = [p.dim() > 1 for p in model.parameters()]
    assert all(c for c, w in zip(changed, weights, strict=True) if w)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "softsign"}, "activation"),
        ({"cutoff": 0.0}, "cutoff"),
        ({"hidden_channels": 0}, "hidden_channels"),
        ({"edge_features": "spherical"}, "edge_features"),
        ({"edge_features": "radial", "num_radial": 1}, "num_freqs >= 2"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GNS(**kwargs)


def test_unknown_element_is_a_clear_error(slabs) -> None:
    batch = make_batch(slabs[:1])
    batch[K.ATOMIC_NUMBERS] = batch[K.ATOMIC_NUMBERS].clone()
    batch[K.ATOMIC_NUMBERS][0] = 105
    with pytest.raises(ValueError, match="atomic numbers 1..100"):
        GNS(hidden_channels=8, num_interactions=1)(batch)


@pytest.mark.parametrize("activation", ["relu", "swish", "gelu", "tanh"])
def test_mlp_layout(activation) -> None:
    net = mlp(4, 8, 3, layers=2, activation=activation)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(4, 8), (8, 8), (8, 3)]
    assert not isinstance(net[-1], nn.ReLU | nn.SiLU | nn.GELU | nn.Tanh)  # linear output


def test_edge_features_layout() -> None:
    """displacement: [v/c, |v|/c]; radial adds g_k(|v|) * envelope; directional adds v/|v| g_k."""
    c, k = 5.0, 6
    vec = torch.tensor([[1.0, -2.0, 2.0], [0.0, 0.0, 4.999], [3.0, 0.0, 0.0]], dtype=torch.float64)
    d = vec.norm(dim=-1, keepdim=True)
    plain = GNS(hidden_channels=8, num_interactions=0, cutoff=c).double().encode_edges(vec)
    torch.testing.assert_close(plain, torch.cat([vec / c, d / c], 1))
    radial = GNS(
        hidden_channels=8, num_interactions=0, cutoff=c, edge_features="radial", num_radial=k
    )
    directional = GNS(
        hidden_channels=8, num_interactions=0, cutoff=c, edge_features="directional", num_radial=k
    )
    r = radial.double().encode_edges(vec)
    x = directional.double().encode_edges(vec)
    assert r.shape == (3, 4 + k) and x.shape == (3, 4 + 4 * k)
    centres = torch.linspace(0, c, k, dtype=torch.float64)
    width = c / (k - 1)
    envelope = 0.5 * (torch.cos(torch.pi * d / c) + 1)
    g = torch.exp(-0.5 * ((d - centres) / width) ** 2) * envelope  # [3, k]
    torch.testing.assert_close(r[:, 4:], g)
    torch.testing.assert_close(x[:, : 4 + k], r)
    torch.testing.assert_close(x[:, 4 + k :].reshape(3, 3, k), (vec / d)[:, :, None] * g[:, None])
    assert x[1, 4:].abs().max() < 1e-6  # an edge at the cutoff has (almost) no radial features


def test_zero_init_decoder_predicts_zero_and_learns(slabs) -> None:
    torch.manual_seed(0)
    model = GNS(hidden_channels=16, num_interactions=1, cutoff=4.5, zero_init_decoder=True)
    batch = make_batch(slabs[:2])
    assert torch.count_nonzero(model(batch)[K.OUT_FORCES]) == 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(batch)[K.OUT_FORCES] - batch[K.FORCES]).abs().mean().backward()
        opt.step()
    assert torch.count_nonzero(model(batch)[K.OUT_FORCES]) > 0
    model.reset_parameters()
    assert torch.count_nonzero(model(batch)[K.OUT_FORCES]) == 0


def test_batch_norm_normalises_the_summed_messages() -> None:
    """In training mode every channel of the normalised sum has mean 0 and variance 1."""
    torch.manual_seed(0)
    block = InteractionNetwork(hidden_channels=6, mlp_layers=1, activation="relu", batch_norm=True)
    seen = {}
    block.node_mlp[0].register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    nodes, edges = torch.randn(40, 6), torch.randn(120, 6)
    edge_index = torch.stack([torch.randint(0, 40, (120,)), torch.arange(120) % 40])
    block(nodes, edges, edge_index)
    agg = seen["x"][:, 6:]
    torch.testing.assert_close(agg.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(agg.var(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_batch_norm_replaces_the_edge_encoder_layer_norm() -> None:
    plain, batch = (
        GNS(hidden_channels=8, num_interactions=1),
        GNS(hidden_channels=8, num_interactions=1, batch_norm=True),
    )
    assert isinstance(plain.edge_norm, nn.LayerNorm) and isinstance(
        plain.processor[0].agg_norm, nn.Identity
    )
    assert isinstance(batch.edge_norm, nn.BatchNorm1d)
    assert isinstance(batch.processor[0].agg_norm, nn.BatchNorm1d)
    assert isinstance(batch.node_norm, nn.LayerNorm)  # the node encoder keeps its LayerNorm


@pytest.mark.parametrize("edge_features", ["radial", "directional"])
def test_recipe_variants_keep_the_symmetries(edge_features, slabs, float64) -> None:
    """Batched == one by one, permutation equivariance, translation invariance (eval mode)."""
    torch.manual_seed(0)
    model = GNS(
        hidden_channels=16,
        num_interactions=2,
        cutoff=4.5,
        edge_features=edge_features,
        num_radial=8,
        batch_norm=True,
    ).double()
    model.train()
    model(
        make_batch(slabs[:3], torch.float64)
    )  # fill the BatchNorm running statistics with real values
    model.eval()
    batch = make_batch(slabs[:3], torch.float64)
    out = model(batch)[K.OUT_FORCES]
    one_by_one = torch.cat([model(make_batch([s], torch.float64))[K.OUT_FORCES] for s in slabs[:3]])
    torch.testing.assert_close(out, one_by_one)
    shifted = dict(batch, pos=batch[K.POS] + torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64))
    torch.testing.assert_close(model(shifted)[K.OUT_FORCES], out)
    single = make_batch(slabs[:1], torch.float64)
    n = len(single[K.ATOMIC_NUMBERS])
    perm = torch.randperm(n)
    inv = torch.argsort(perm)
    permuted = dict(single)
    for key in (K.POS, K.ATOMIC_NUMBERS, K.TAGS, K.FIXED, K.FORCES):
        if key in single:
            permuted[key] = single[key][perm]
    permuted[K.EDGE_INDEX] = inv[single[K.EDGE_INDEX]]
    torch.testing.assert_close(model(permuted)[K.OUT_FORCES], model(single)[K.OUT_FORCES][perm])
