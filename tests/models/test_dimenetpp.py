"""DimeNet++-specific tests: agreement with PyG's DimeNet++, triplets across periodic
images (supercells), the cosine spherical basis, finite training with collinear triplets.

The model-independent physics contract (symmetries, batching, gradient forces, also in a
cell whose atoms see their own images) lives in ``test_contract.py``. The reference output
layers start at zero (E = F = 0 untrained), so the physics tests here use
``output_initializer="glorot_orthogonal"``; otherwise the checks could not fail.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch_geometric.nn.models.dimenet as pyg_dimenet
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from conftest import TINY_KWARGS, exact_batch, predict
from torch_geometric.nn.models.dimenet import SphericalBasisLayer

from forcenet.data import keys as K
from forcenet.geometry import triplets
from forcenet.models.dimenetpp import CosineSphericalBasis, DimeNetPlusPlus

F64 = {"rtol": 1e-8, "atol": 1e-10}
KW = TINY_KWARGS["dimenetpp"]
#: (num_spherical, num_radial) where PyG's own basis is built too (sympy: seconds per size)
SMALL_BASIS = (3, 2)


def _model(dtype: torch.dtype = torch.float64, **overrides) -> DimeNetPlusPlus:
    """Tiny model with non-zero output layers, seed 0, in eval mode."""
    torch.manual_seed(0)
    model = DimeNetPlusPlus(**{**KW, "output_initializer": "glorot_orthogonal", **overrides})
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def model64() -> DimeNetPlusPlus:
    return _model()


def _slab(seed: int, size=(2, 2, 2), repeat=(1, 1, 1)) -> Atoms:
    """Rattled Pt(111) slab with an O adatom (periodic in x, y), optionally repeated."""
    atoms = fcc111("Pt", size=size, vacuum=5.0)
    atoms.append("O")
    atoms.positions[-1] = atoms.positions[-2] + [0.0, 1.6, 1.5]
    atoms.rattle(stdev=0.08, seed=seed)
    return atoms.repeat(repeat)


def _bulk_pair(seed: int, repeat=(1, 1, 1), rattle: float = 0.1) -> Atoms:
    """2-atom rocksalt cell: at a 4.5 Å cutoff, i's other images are neighbors of j."""
    atoms = bulk("NiO", "rocksalt", a=4.2)
    atoms.rattle(stdev=rattle, seed=seed)
    return atoms.repeat(repeat)


def test_defaults_are_ocp_s2ef():
    params = inspect.signature(DimeNetPlusPlus).parameters
    defaults = {name: p.default for name, p in params.items()}
    assert defaults == {
        "hidden_channels": 192,
        "out_emb_channels": 192,
        "num_blocks": 3,
        "int_emb_size": 64,
        "basis_emb_size": 8,
        "num_spherical": 7,
        "num_radial": 6,
        "cutoff": 6.0,
        "envelope_exponent": 5,
        "num_before_skip": 1,
        "num_after_skip": 2,
        "num_output_layers": 3,
        "output_initializer": "zeros",
    }
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert DimeNetPlusPlus.energy_from_gradient is True
    with pytest.raises(ValueError, match="output_initializer"):
        DimeNetPlusPlus(**dict(KW, output_initializer="ones"))


def test_cosine_basis_equals_pyg_angle_basis(float64):
    ref = SphericalBasisLayer(*SMALL_BASIS, cutoff=4.5, envelope_exponent=5)
    ours = CosineSphericalBasis(*SMALL_BASIS, cutoff=4.5, envelope_exponent=5)
    gen = torch.Generator().manual_seed(0)
    dist = 0.8 + 3.5 * torch.rand(10, generator=gen, dtype=float64)
    angle = math.pi * torch.rand(25, generator=gen, dtype=float64)
    idx_kj = torch.randint(0, 10, (25,), generator=gen)
    expected = ref(dist, angle, idx_kj)
    torch.testing.assert_close(ours(dist, torch.cos(angle), idx_kj), expected, **F64)
    assert expected.shape == (25, 6) and expected.abs().max() > 0.1


def test_energy_matches_pyg_dimenetpp_forward(float64, monkeypatch):
    """PyG's own forward, fed our graph and triplets instead of radius_graph/torch-sparse,
    gives our energy with the same weights (molecule in free space)."""
    kw = dict(KW, num_spherical=SMALL_BASIS[0], num_radial=SMALL_BASIS[1])
    model = _model(**kw)
    mol = molecule("CH3CH2OH")
    mol.cell = np.zeros((3, 3))
    batch = exact_batch([mol])
    edge_index = batch[K.EDGE_INDEX]
    monkeypatch.setattr(pyg_dimenet, "radius_graph", lambda *a, **k: edge_index)

    def pyg_style_triplets(ei, num_nodes):
        t = triplets(ei, torch.zeros(ei.shape[1], 3), num_nodes)
        return ei[1], ei[0], t.i, t.j, t.k, t.idx_kj, t.idx_ji

    monkeypatch.setattr(pyg_dimenet, "triplets", pyg_style_triplets)
    ref = pyg_dimenet.DimeNetPlusPlus(out_channels=1, **kw).to(float64)  # zero outputs
    ref.load_state_dict(model.state_dict())
    expected = ref(batch[K.ATOMIC_NUMBERS], batch[K.POS], batch[K.BATCH]).squeeze(-1)
    torch.testing.assert_close(predict(model, batch)[K.OUT_ENERGY], expected, **F64)
    assert expected.abs().max() > 1e-3


def test_supercell_doubles_energy_and_repeats_forces(model64):
    """Triplets through periodic images are right: a 2x1x1 supercell is the same crystal."""
    for small, big in [
        (_bulk_pair(3), _bulk_pair(3, repeat=(2, 1, 1))),
        (_slab(4), _slab(4, repeat=(2, 1, 1))),
    ]:
        out_small = predict(model64, exact_batch([small]))
        out_big = predict(model64, exact_batch([big]))
        torch.testing.assert_close(out_big[K.OUT_ENERGY], 2 * out_small[K.OUT_ENERGY], **F64)
        expected = torch.cat([out_small[K.OUT_FORCES]] * 2)  # ASE repeat: copies in order
        torch.testing.assert_close(out_big[K.OUT_FORCES], expected, rtol=1e-7, atol=1e-9)
        assert out_small[K.OUT_FORCES].abs().max() > 1e-3


def test_force_training_is_finite_with_collinear_triplets():
    """A perfect crystal has exactly collinear triplets; the double backward of a force
    loss must stay finite (angles enter through their cosine)."""
    model = _model(torch.float32).train()
    batch = exact_batch([_bulk_pair(0, rattle=0.0)], torch.float32)
    out = model(batch)
    assert out[K.OUT_FORCES].requires_grad
    (out[K.OUT_FORCES].pow(2).mean() + out[K.OUT_ENERGY].pow(2).mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    sbf_grad = model.interaction_blocks[0].lin_sbf1.weight.grad
    assert sbf_grad is not None and sbf_grad.abs().sum() > 0


def test_eval_under_no_grad_and_isolated_atom():
    model = _model(torch.float32)
    far = Atoms("O", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 20.0, pbc=True)
    batch = exact_batch([far, _bulk_pair(8)], torch.float32)
    with torch.no_grad():
        out = model(batch)
    assert not out[K.OUT_ENERGY].requires_grad and not out[K.OUT_FORCES].requires_grad
    assert torch.equal(out[K.OUT_FORCES][0], torch.zeros(3))  # no neighbors: no force
    assert out[K.OUT_FORCES][1:].abs().sum() > 0
    assert not batch[K.POS].requires_grad


def test_rejects_atomic_numbers_outside_the_table():
    model = _model(torch.float32)
    batch = exact_batch([_bulk_pair(9)], torch.float32)
    bad = dict(batch, atomic_numbers=batch[K.ATOMIC_NUMBERS].clone().fill_(95))
    with pytest.raises(ValueError, match=r"DimeNet\+\+: atomic numbers must be in 1..94"):
        model(bad)
