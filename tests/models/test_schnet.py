"""SchNet-specific tests: agreement with PyG's SchNet, periodic supercells, forces from the
caller's own positions, the undirected edge pairs.

The model-independent physics contract (symmetries, batching, gradient forces, also in a
cell whose atoms see their own images) lives in ``test_contract.py``; these tests pin what
is particular to SchNet under periodic boundaries (small float64 fixtures, a few seconds).
"""

from __future__ import annotations

import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from conftest import TINY_KWARGS, exact_batch, predict
from torch_geometric.nn.models import SchNet as PygSchNet

from forcenet.data import keys as K
from forcenet.geometry import edge_vectors
from forcenet.models.schnet import SchNet, undirected_pairs

F64 = {"rtol": 1e-8, "atol": 1e-10}


def _tiny(dtype: torch.dtype = torch.float64, seed: int = 0) -> SchNet:
    torch.manual_seed(seed)
    return SchNet(**TINY_KWARGS["schnet"]).to(dtype).eval()


def _slab(seed: int, size=(2, 2, 3), repeat=(1, 1, 1)) -> Atoms:
    """Rattled Cu(111) slab (periodic in x, y), optionally repeated."""
    atoms = fcc111("Cu", size=size, vacuum=5.0)
    atoms.rattle(stdev=0.08, seed=seed)
    return atoms.repeat(repeat)


def _bulk_pair(seed: int, repeat=(1, 1, 1)) -> Atoms:
    """Rattled 2-atom rocksalt cell (skewed, fully periodic), optionally repeated."""
    atoms = bulk("NiO", "rocksalt", a=4.2)
    atoms.rattle(stdev=0.1, seed=seed)
    return atoms.repeat(repeat)


def test_defaults_are_ocp_s2ef_and_match_pyg_parameter_count():
    model = SchNet()
    assert (model.hidden_channels, model.num_filters, model.num_interactions) == (1024, 256, 3)
    assert (model.num_gaussians, model.cutoff) == (200, 6.0)
    assert SchNet.energy_from_gradient is True
    ref = PygSchNet(hidden_channels=1024, num_filters=256, num_interactions=3, num_gaussians=200)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())


def test_energy_matches_pyg_schnet_on_our_periodic_graph(float64):
    """Same weights, same edges: PyG's forward (fed our PBC distances) gives our energy."""
    model = _tiny()
    batch = exact_batch([_slab(1), _bulk_pair(2)])
    vec = edge_vectors(
        batch[K.POS], batch[K.CELL], batch[K.BATCH], batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
    )
    graph = (batch[K.EDGE_INDEX], vec.norm(dim=-1))
    kw = TINY_KWARGS["schnet"]
    ref = PygSchNet(**kw, interaction_graph=lambda pos, b: graph).to(float64)
    ref.load_state_dict(model.state_dict())
    expected = ref(batch[K.ATOMIC_NUMBERS], batch[K.POS], batch[K.BATCH]).squeeze(-1)
    torch.testing.assert_close(predict(model, batch)[K.OUT_ENERGY], expected, **F64)


def test_supercell_doubles_energy_and_repeats_forces(float64):
    """A 2x1x1 supercell is the same periodic crystal: E doubles, forces repeat."""
    model = _tiny()
    for small, big in [
        (_bulk_pair(3), _bulk_pair(3, repeat=(2, 1, 1))),
        (_slab(4, size=(2, 2, 2)), _slab(4, size=(2, 2, 2), repeat=(2, 1, 1))),
    ]:
        out_small = predict(model, exact_batch([small]))
        out_big = predict(model, exact_batch([big]))
        torch.testing.assert_close(out_big[K.OUT_ENERGY], 2 * out_small[K.OUT_ENERGY], **F64)
        expected = torch.cat([out_small[K.OUT_FORCES]] * 2)  # ASE repeat: copies in order
        torch.testing.assert_close(out_big[K.OUT_FORCES], expected, rtol=1e-7, atol=1e-9)
        assert out_small[K.OUT_FORCES].abs().max() > 1e-3  # non-trivial forces


def test_training_mode_keeps_force_graph_and_eval_does_not():
    model = _tiny(torch.float32).train()
    batch = exact_batch([_slab(8)], torch.float32)
    out = model(batch)
    assert out[K.OUT_FORCES].requires_grad  # create_graph=True: the force loss trains
    out[K.OUT_FORCES].pow(2).mean().backward()
    filt = model.interactions[0].mlp[0].weight.grad
    assert filt is not None and filt.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert not out[K.OUT_FORCES].requires_grad and not out[K.OUT_ENERGY].requires_grad
    assert not batch[K.POS].requires_grad and out[K.OUT_FORCES].abs().sum() > 0


def test_positions_that_require_grad_are_used_directly(float64):
    """A caller differentiating through the model (e.g. a Hessian) gets its own pos back."""
    model = _tiny()
    batch = exact_batch([_bulk_pair(9)])
    pos = batch[K.POS].clone().requires_grad_(True)
    out = model(dict(batch, pos=pos))
    (grad,) = torch.autograd.grad(out[K.OUT_ENERGY].sum(), pos)
    torch.testing.assert_close(-grad, out[K.OUT_FORCES].detach(), **F64)


def test_rejects_atomic_numbers_outside_the_table():
    model = _tiny(torch.float32)
    batch = exact_batch([_bulk_pair(10)], torch.float32)
    bad = dict(batch, atomic_numbers=batch[K.ATOMIC_NUMBERS].clone().fill_(118))
    with pytest.raises(ValueError, match="SchNet: atomic numbers must be in 1..99"):
        model(bad)


def test_undirected_pairs_join_each_edge_with_its_reverse():
    """Pairs hold an edge and its reverse (atoms swapped, offset negated), self images too."""
    batch = exact_batch([_bulk_pair(11), _slab(12)], torch.float32)
    edge_index, offsets = batch[K.EDGE_INDEX], batch[K.CELL_OFFSETS]
    order = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    edge_index, offsets = edge_index[:, order], offsets[order]  # any edge order works
    rep, inverse = undirected_pairs(edge_index, offsets, batch[K.POS].shape[0])
    assert rep.numel() * 2 == edge_index.shape[1]  # symmetric graph: every edge has a twin
    assert torch.equal(inverse[rep], torch.arange(rep.numel()))
    src, dst = edge_index
    twin = torch.full_like(inverse, -1)
    for e in range(inverse.numel()):  # the other member of e's pair
        members = (inverse == inverse[e]).nonzero().flatten().tolist()
        assert len(members) == 2
        twin[e] = members[0] if members[1] == e else members[1]
    assert torch.equal(src[twin], dst) and torch.equal(dst[twin], src)
    assert torch.equal(offsets[twin], -offsets)
    assert bool((src == dst).any())  # the 2-atom cell has edges to an atom's own images
    # a truncated graph (one direction dropped) keeps the lone edge as its own pair
    rep1, inverse1 = undirected_pairs(edge_index[:, 1:], offsets[1:], batch[K.POS].shape[0])
    assert rep1.numel() == rep.numel() and int(torch.bincount(inverse1).min()) == 1
