"""ForceNet specifics: size of the paper config, the split-Linear filter, every basis and
ablation, element-table errors and edge features. The shared physics contract is in
test_contract.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_batch

from forcenet.data import keys as K
from forcenet.geometry import edge_vectors
from forcenet.models import elements
from forcenet.models.forcenet import AblationName, BasisName, ForceNet
from forcenet.models.forcenet_blocks import ConditionalFilter, EdgeOnlyFilter

TINY = {"hidden_channels": 8, "num_interactions": 2, "num_freqs": 4, "decoder_hidden_channels": 8}


def _tiny(**kw) -> ForceNet:
    torch.manual_seed(0)
    return ForceNet(**{**TINY, **kw})


def _reference_param_count(h: int, d: int, blocks: int, f: int, n_sh: int) -> int:
    """Learnable parameters of the reference layer shapes (sphallmul, depths 2/1, mlp decoder)."""
    lin = lambda i, o: i * o + o  # noqa: E731
    embed = lin(9 * f, h)
    radial = lin(4 * f, 4)  # Linear(sine(4 distances) -> 4), shared by all blocks
    block = lin(4 * n_sh, h) + lin(3 * h, h) + 2 * lin(h, h)  # basis + filter MLP
    block += lin(h, h) + h  # node pre-transform + self-term vector c
    block += lin(h, h) + 2 * h + lin(h, h)  # node MLP with BatchNorm
    head = lin(h, d) + lin(d, d) + 2 * d + lin(d, 3)
    return embed + radial + blocks * block + head


def test_paper_config_parameter_count() -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model, with_energy = ForceNet(), ForceNet(energy_head=True)
    n = sum(p.numel() for p in model.parameters())
    assert n == _reference_param_count(512, 512, 5, 50, 9)
    assert abs(n - 11.36e6) / 11.36e6 < 0.02
    assert sum(p.numel() for p in with_energy.parameters()) == n + 512 + 1


@pytest.mark.parametrize("filter_cls", [ConditionalFilter, EdgeOnlyFilter])
def test_split_linear_filter_equals_concatenated_form(filter_cls, float64) -> None:
    torch.manual_seed(0)
    hidden, n, e, b = 6, 5, 17, 4
    filt = filter_cls(hidden, b, 2, "swish")
    for p in filt.parameters():  # non-zero biases so the fused bias is exercised
        torch.nn.init.normal_(p)
    basis, h = torch.randn(e, b), torch.randn(n, hidden)
    j, i = torch.randint(0, n, (e,)), torch.randint(0, n, (e,))
    envelope = torch.rand(e, 1)
    edge = filt.lin_basis(basis)
    first_in = torch.cat([edge, h[j], h[i]], dim=1) if filter_cls is ConditionalFilter else edge
    expected = filt.tail(filt.first(first_in)) * envelope
    torch.testing.assert_close(filt(basis, envelope, h, j, i), expected, rtol=1e-12, atol=1e-12)


def test_forward_shapes_dtypes_energy_only_when_asked(slabs) -> None:
    batch = make_batch(slabs)
    before = {k: v.clone() for k, v in batch.items()}
    out = _tiny()(batch)
    n, g = batch[K.POS].shape[0], len(slabs)
    assert set(out) == {K.OUT_FORCES}
    assert out[K.OUT_FORCES].shape == (n, 3) and out[K.OUT_FORCES].dtype == torch.float32
    assert torch.isfinite(out[K.OUT_FORCES]).all()
    out_e = _tiny(energy_head=True)(batch)
    assert set(out_e) == {K.OUT_FORCES, K.OUT_ENERGY}
    assert out_e[K.OUT_ENERGY].shape == (g,) and torch.isfinite(out_e[K.OUT_ENERGY]).all()
    for key, value in before.items():
        assert torch.equal(batch[key], value), f"forward mutated batch[{key!r}]"
    assert ForceNet.energy_from_gradient is False


def test_energy_head_sums_over_each_graph(slabs) -> None:
    """The energy of two structures batched together is the energy of each alone."""
    model = _tiny(energy_head=True).eval()
    both = model(make_batch(slabs[:2]))[K.OUT_ENERGY]
    alone = torch.cat([model(make_batch([s]))[K.OUT_ENERGY] for s in slabs[:2]])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("basis", BasisName.__args__)
def test_every_basis_builds_and_runs(basis, slabs) -> None:
    batch = make_batch(slabs[:2])
    model = _tiny(basis=basis, num_interactions=1, max_n=4)
    vec = edge_vectors(
        batch[K.POS], batch[K.CELL], batch[K.BATCH], batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
    )
    d = vec.norm(dim=1)
    j, i = batch[K.EDGE_INDEX]
    feats = model.edge_basis(vec / d[:, None], model.distances(d, batch[K.ATOMIC_NUMBERS], j, i))
    assert feats.shape == (d.shape[0], model.edge_basis.out_features)
    assert torch.isfinite(feats).all()
    assert torch.isfinite(model(batch)[K.OUT_FORCES]).all()


def test_default_edge_basis_is_36_sph_times_radial_features() -> None:
    assert ForceNet(**TINY).edge_basis.out_features == 9 * 4  # degrees 0..2 x 4 distances
    assert ForceNet(**TINY, basis="sphallcat").edge_basis.out_features == 9 + 4 * 4
    assert ForceNet(**TINY, basis="powersine").edge_basis.out_features == 7 * 4


@pytest.mark.parametrize("ablation", AblationName.__args__)
def test_every_ablation_builds_runs_and_trains_all_parameters(ablation, slabs) -> None:
    model = _tiny(ablation=ablation, energy_head=True).train()
    out = model(make_batch(slabs[:2]))
    assert torch.isfinite(out[K.OUT_FORCES]).all()
    (out[K.OUT_FORCES].square().sum() + out[K.OUT_ENERGY].sum()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (would break DDP): {unused}"


def test_ablations_change_the_intended_parts() -> None:
    block = lambda **kw: _tiny(**kw).interactions[0]  # noqa: E731
    assert not hasattr(block(ablation="noself").message, "center")
    assert not hasattr(block(ablation="nofilter").message, "lin")
    assert block(ablation="nocond").filter.first.in_features == TINY["hidden_channels"]
    assert isinstance(block(ablation="edgelinear").filter.tail[0], torch.nn.BatchNorm1d)
    assert isinstance(block(ablation="nodelinear").node_mlp[1], torch.nn.BatchNorm1d)
    assert len(block(depth_mlp_edge=3).filter.tail) == 6
    assert _tiny(ablation="nodistlist").edge_basis.out_features == 9 * 1
    assert _tiny(ablation="onlydist").edge_basis.out_features == 4 * TINY["num_freqs"]


def test_nocond_filter_ignores_node_embeddings() -> None:
    filt = _tiny(ablation="nocond").interactions[0].filter
    basis, env = torch.randn(5, filt.lin_basis.in_features), torch.ones(5, 1)
    j = i = torch.zeros(5, dtype=torch.long)
    h1, h2 = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(filt(basis, env, h1, j, i), filt(basis, env, h2, j, i))


def test_onlydist_is_invariant_to_rotation(slabs) -> None:
    """Without direction features the model sees only distances: rotations change nothing."""
    model = _tiny(ablation="onlydist").eval()
    batch = make_batch(slabs[:2])
    rot = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0.5], [0.3, 0, -0.2], [-0.5, 0.2, 0]]))
    rotated = {**batch, K.POS: batch[K.POS] @ rot, K.CELL: batch[K.CELL] @ rot}
    torch.testing.assert_close(model(rotated)[K.OUT_FORCES], model(batch)[K.OUT_FORCES])


def test_radius_distance_features_by_hand(float64) -> None:
    model = ForceNet(**TINY, cutoff=6.0)
    z = torch.tensor([1, 78])  # H (0.25 Å), Pt (1.35 Å)
    d = torch.tensor([3.0, 1.2])
    j, i = torch.tensor([0, 1]), torch.tensor([1, 0])  # edge 0: H -> Pt; edge 1: Pt -> H
    feats = model.distances(d, z, j, i)
    expected = torch.tensor([[3.0, 3.0 - 0.25, 3.0 - 1.35, 3.0 - 1.6], [1.2, 1.2 - 1.35, 0.95, 0]])
    torch.testing.assert_close(feats, (expected / 6.0).clamp(min=1e-3))


def test_element_tables_match_reference_examples() -> None:
    raw = elements.raw_features()
    np.testing.assert_allclose(raw[1], [1, 1, 2.19, 31, 1, 13.60, 0.754, 1, 14.1], rtol=2e-3)
    np.testing.assert_allclose(raw[78], [10, 6, 1.45, 136, 10, 8.96, 2.128, 3, 9.1], rtol=2e-3)
    scaled = elements.scaled_features()
    known = elements.feature_support()
    assert np.nanmin(scaled, axis=0).tolist() == [0.0] * 9
    assert np.nanmax(scaled, axis=0).tolist() == [1.0] * 9
    assert sorted(np.flatnonzero(~known).tolist()) == [0, 85, 87, 97, 98, 99, 100]
    radii = elements.atomic_radii()
    np.testing.assert_allclose(radii[[1, 6, 8, 26, 78]], [0.25, 0.70, 0.60, 1.40, 1.35])
    assert sorted(np.flatnonzero(~elements.radius_support()).tolist()) == [
        0,
        36,
        54,
        85,
        86,
        87,
        96,
        97,
        98,
        99,
        100,
    ]


def _with_element(record: dict, z: int) -> dict:
    numbers = record[K.ATOMIC_NUMBERS].copy()
    numbers[-1] = z
    return {**record, K.ATOMIC_NUMBERS: numbers}


@pytest.mark.parametrize(
    ("z", "kwargs", "name"),
    [
        (85, {}, "At"),  # no continuous features
        (36, {}, "Kr"),  # features but no atomic radius
        (36, {"feat": "simple"}, "Kr"),
        (0, {}, "Z=0"),
        (101, {"feat": "simple", "ablation": "nodistlist"}, "Md"),
    ],
)
def test_elements_without_data_raise_a_clear_error(z, kwargs, name, slabs) -> None:
    batch = make_batch([_with_element(slabs[0], z)])
    with pytest.raises(elements.UnsupportedElementError, match=f"ForceNet has no .*{name}"):
        _tiny(**kwargs)(batch)


def test_element_without_radius_is_fine_when_radii_are_unused(slabs) -> None:
    batch = make_batch([_with_element(slabs[0], 36)])
    out = _tiny(feat="simple", ablation="nodistlist")(batch)
    assert torch.isfinite(out[K.OUT_FORCES]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"basis": "bessel"}, "basis must be one of"),
        ({"ablation": "nothing"}, "ablation must be one of"),
        ({"activation": "gelu"}, "activation must be one of"),
        ({"depth_mlp_edge": -1}, "depth_mlp_edge"),
        ({"hidden_channels": 0}, "hidden_channels"),
        ({"cutoff": 0.0}, "cutoff"),
        ({"basis_init_gain": 0.0}, "basis_init_gain"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ForceNet(**{**TINY, **kwargs})


def test_reset_parameters_follows_reference_init() -> None:
    model = _tiny(energy_head=True)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    model.reset_parameters()
    first = model.interactions[0].filter.first
    assert torch.all(first.bias == 0)
    bound = math.sqrt(6.0 / (first.in_features + first.out_features))  # Xavier uniform
    assert first.weight.abs().max() <= bound and first.weight.std() > bound / 4
    assert torch.all(model.decoder[0].bias == 0)
    assert not torch.any(model.energy_head.weight == 0.123)
    assert not torch.any(model.atom_embedding.lin.weight == 0.123)


def test_zero_init_decoder_starts_at_zero_forces_and_still_learns(slabs) -> None:
    batch = make_batch(slabs)
    model = _tiny(zero_init_decoder=True)
    forces = model(batch)[K.OUT_FORCES]
    assert torch.equal(forces, torch.zeros_like(forces))
    # the last layer gets a gradient at once, so training leaves F = 0 after one step
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn_like(forces)
    (model(batch)[K.OUT_FORCES] - target).abs().mean().backward()
    opt.step()
    assert model(batch)[K.OUT_FORCES].abs().max() > 0
    assert not torch.equal(_tiny().decoder[-1].weight, torch.zeros_like(model.decoder[-1].weight))


def test_basis_init_gain_scales_only_the_basis_projections() -> None:
    plain, scaled = _tiny(), _tiny(basis_init_gain=30.0)
    for name, p in plain.named_parameters():
        q = dict(scaled.named_parameters())[name]
        factor = 30.0 if name.endswith("filter.lin_basis.weight") else 1.0
        torch.testing.assert_close(q, p * factor)
