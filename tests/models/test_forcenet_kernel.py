"""ForceNet's fused CPU edge pass (forcenet.models.forcenet_kernel) equals the module path:
forces and every gradient, on many small chunks; and it is used only where it applies."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from test_forcenet import TINY, _tiny

import forcenet.models.forcenet_blocks as fn
from forcenet.data import keys as K
from forcenet.models import forcenet_kernel as kernel
from forcenet.models.forcenet_blocks import InteractionBlock


def _fused_vs_unfused(monkeypatch, kw: dict, batch, *, pos_grad: bool) -> tuple[dict, dict]:
    """Forces and every gradient (parameters, and positions when ``pos_grad``) of the same
    model with the fused CPU edge pass on (tiny chunks: many of them) and off."""
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(fn, "FUSED_EDGE_PASS", fused)
        monkeypatch.setattr(kernel, "FUSED_CHUNK_BYTES", 1)  # 64-edge chunks
        model = _tiny(**kw).double()
        b = dict(batch)
        if pos_grad:
            b[K.POS] = batch[K.POS].clone().requires_grad_(True)
        forces = model(b)[K.OUT_FORCES]
        (forces * torch.linspace(-1, 2, forces.numel()).view_as(forces)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if pos_grad:
            grads["pos"] = b[K.POS].grad.clone()
        results[fused] = {"forces": forces.detach(), **grads}
    return results[True], results[False]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"depth_mlp_edge": 1},
        {"depth_mlp_edge": 3},
        {"ablation": "noself"},
        {"energy_head": True},
    ],
)
def test_fused_edge_pass_equals_the_module_path(kw, slabs, monkeypatch, float64) -> None:
    batch = make_batch(slabs, torch.float64)
    assert batch[K.EDGE_INDEX].shape[1] > 3 * 64  # several chunks
    fused, plain = _fused_vs_unfused(monkeypatch, kw, batch, pos_grad=False)
    assert fused.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-10, atol=1e-12, msg=key)


def test_fused_edge_pass_differentiates_positions_too(slabs, monkeypatch, float64) -> None:
    batch = make_batch(slabs, torch.float64)
    fused, plain = _fused_vs_unfused(monkeypatch, {}, batch, pos_grad=True)
    assert plain["pos"].abs().max() > 0
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-10, atol=1e-12, msg=key)


def test_fused_edge_pass_applies_only_to_its_form(slabs) -> None:
    h = torch.zeros(3, TINY["hidden_channels"])
    fusable = lambda m: [blk._fused_tail(h) is not None for blk in m.interactions]  # noqa: E731
    assert all(fusable(_tiny()))
    assert all(fusable(_tiny(ablation="noself")))
    for kw in (
        {"activation": "ssp"},
        {"ablation": "edgelinear"},
        {"ablation": "nocond"},
        {"ablation": "nofilter"},
    ):
        assert not any(fusable(_tiny(**kw))), kw
    block = _tiny().interactions[0]
    assert isinstance(block, InteractionBlock)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block._fused_tail(h) is None
    # no_grad inference (nothing saved for backward) gives the same forces
    batch = make_batch(slabs)
    model = _tiny().eval()
    with torch.no_grad():
        fast = model(batch)[K.OUT_FORCES]
    torch.testing.assert_close(fast, model(batch)[K.OUT_FORCES].detach(), rtol=1e-5, atol=1e-6)
