"""Losses (tag weights, free atoms, normalisation, DDP-style global means) and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from forcenet import losses as L
from forcenet.data import keys as K
from forcenet.schedule import budget_progress, lr_factor, total_steps

TAGS = torch.tensor([0, 0, 1, 1, 2])
FIXED = torch.tensor([True, True, False, False, False])


def test_atom_weights_tag_and_free():
    w = L.atom_weights(TAGS, FIXED, atoms="tag_weighted", tag_weights=L.FORCENET_TAG_WEIGHTS)
    assert w.tolist() == pytest.approx([0.05, 0.05, 1.0, 1.0, 1.0])
    assert L.atom_weights(TAGS, FIXED, atoms="free", tag_weights=()).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="tags must be in"):
        L.atom_weights(
            torch.tensor([3]),
            torch.tensor([False]),
            atoms="tag_weighted",
            tag_weights=(1.0, 1.0, 1.0),
        )


def test_weighted_l1_is_the_forcenet_formula():
    torch.manual_seed(0)
    pred, target = torch.randn(5, 3), torch.randn(5, 3)
    w = L.atom_weights(TAGS, FIXED, atoms="tag_weighted", tag_weights=L.FORCENET_TAG_WEIGHTS)
    term = L.force_loss(pred, target, w, kind="l1", force_scale=1.0)
    expected = (w[:, None] * (pred - target).abs()).sum() / (3 * w.sum())
    assert float(term.total / term.weight) == pytest.approx(float(expected), rel=1e-6)
    # normalising by a force scale divides an L1 loss by that scale
    scaled = L.force_loss(pred, target, w, kind="l1", force_scale=2.0)
    assert float(scaled.total) == pytest.approx(float(term.total) / 2.0, rel=1e-6)


@pytest.mark.parametrize("kind", ["l1", "l2", "smooth_l1", "l2norm", "berhu"])
def test_force_losses_vanish_at_the_target_with_finite_gradients(kind):
    target = torch.randn(4, 3)
    pred = target.clone().requires_grad_(True)
    err = L.per_atom_force_error(pred, target, kind)
    assert float(err.detach().abs().max()) < 1e-5
    err.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_smooth_l1_is_quadratic_then_linear():
    zero = torch.zeros(1, 3)
    small = L.per_atom_force_error(torch.full((1, 3), 0.5), zero, "smooth_l1")
    large = L.per_atom_force_error(torch.full((1, 3), 3.0), zero, "smooth_l1")
    assert float(small) == pytest.approx(0.125)
    assert float(large) == pytest.approx(2.5)
    l2norm = L.per_atom_force_error(torch.tensor([[3.0, 4.0, 0.0]]), torch.zeros(1, 3), "l2norm")
    assert float(l2norm) == pytest.approx(5.0)


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_huber_and_berhu_transitions_at_beta(beta):
    """Huber: a^2 / (2 beta) below beta, a - beta / 2 above; berHu: a below, (a^2 + beta^2)
    / (2 beta) above. Both are continuous with a continuous slope at beta."""
    zero = torch.zeros(1, 3)

    def err(kind, a):
        return float(L.per_atom_force_error(torch.full((1, 3), a), zero, kind, beta))

    for a in (0.5 * beta, 2.0 * beta):
        huber = a * a / (2 * beta) if a < beta else a - beta / 2
        berhu = a if a <= beta else (a * a + beta * beta) / (2 * beta)
        assert err("smooth_l1", a) == pytest.approx(huber, rel=1e-6)
        assert err("berhu", a) == pytest.approx(berhu, rel=1e-6)
    eps = 1e-3 * beta
    for kind in ("smooth_l1", "berhu"):
        assert err(kind, beta - eps) == pytest.approx(err(kind, beta + eps), abs=3 * eps)
        slope_below = (err(kind, beta - eps) - err(kind, beta - 2 * eps)) / eps
        slope_above = (err(kind, beta + 2 * eps) - err(kind, beta + eps)) / eps
        assert slope_below == pytest.approx(slope_above, abs=0.01)
    with pytest.raises(ValueError, match="beta"):
        L.per_atom_force_error(zero, zero, "berhu", 0.0)


def test_adsorbate_atoms_can_have_their_own_loss():
    """adsorbate_kind / adsorbate_beta apply to tag-2 atoms only; the rest keep kind/beta."""
    torch.manual_seed(1)
    pred, target = 3 * torch.randn(5, 3), torch.randn(5, 3)
    batch = {K.FORCES: target, K.TAGS: TAGS, K.FIXED: FIXED}
    loss = _loss(kind="smooth_l1", adsorbate_kind="l2", adsorbate_beta=2.0)
    term = loss.terms({K.OUT_FORCES: pred}, batch)["force"]
    w = L.atom_weights(TAGS, FIXED, atoms="tag_weighted", tag_weights=L.FORCENET_TAG_WEIGHTS)
    per = L.per_atom_force_error(pred, target, "smooth_l1", 1.0)
    per[4] = L.per_atom_force_error(pred[4:], target[4:], "l2", 2.0)[0]
    assert float(term.total) == pytest.approx(float((w * per).sum()), rel=1e-6)
    same = _loss(kind="smooth_l1").terms({K.OUT_FORCES: pred}, batch)["force"]
    assert float(same.total) != pytest.approx(float(term.total))
    only_beta = _loss(kind="smooth_l1", adsorbate_beta=3.0).terms({K.OUT_FORCES: pred}, batch)
    per[4] = L.per_atom_force_error(pred[4:], target[4:], "smooth_l1", 3.0)[0]
    assert float(only_beta["force"].total) == pytest.approx(float((w * per).sum()), rel=1e-6)


def _loss(**kw) -> L.TrainLoss:
    base = dict(
        kind="l1",
        atoms="tag_weighted",
        tag_weights=L.FORCENET_TAG_WEIGHTS,
        force_coef=1.0,
        energy_coef=0.0,
        force_scale=1.0,
        energy_shift=0.0,
        energy_scale=1.0,
    )
    return L.TrainLoss(**(base | kw))


def test_split_batch_with_global_weights_equals_full_batch_loss():
    """What DDP relies on: per-rank losses over global weights sum to the global mean."""
    torch.manual_seed(1)
    pred, target = torch.randn(10, 3), torch.randn(10, 3)
    tags = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 1])
    batch = {K.TAGS: tags, K.FIXED: tags == 0, K.FORCES: target}
    loss_fn = _loss()
    full = loss_fn.terms({K.OUT_FORCES: pred}, batch)
    halves = [
        loss_fn.terms({K.OUT_FORCES: pred[s]}, {k: v[s] for k, v in batch.items()})
        for s in (slice(0, 5), slice(5, 10))
    ]
    total_w = {"force": sum(h["force"].weight for h in halves)}
    split = sum(loss_fn.combine(h, total_w) for h in halves)
    assert float(split) == pytest.approx(
        float(loss_fn.combine(full, {"force": full["force"].weight}))
    )


def test_energy_term_with_zero_coefficient_still_gives_gradients():
    head = nn.Linear(2, 1)
    energy = head(torch.ones(3, 2)).squeeze(-1)  # [G]
    out = {K.OUT_FORCES: torch.zeros(4, 3, requires_grad=True), K.OUT_ENERGY: energy}
    batch = {
        K.TAGS: torch.ones(4, dtype=torch.long),
        K.FIXED: torch.zeros(4, dtype=torch.bool),
        K.FORCES: torch.ones(4, 3),
        K.ENERGY: torch.zeros(3),
    }
    loss_fn = _loss(energy_coef=0.0)
    terms = loss_fn.terms(out, batch)
    loss = loss_fn.combine(terms, {k: t.weight for k, t in terms.items()})
    loss.backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0
    assert float(loss) == pytest.approx(1.0)  # L1 of forces 1 vs 0, energy not counted


def test_energy_loss_on_normalised_energies():
    term = L.energy_loss(
        torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), energy_shift=5.0, energy_scale=2.0
    )
    assert float(term.total / term.weight) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- schedule

KW = dict(warmup_steps=10, warmup_start=0.2, milestones=(0.5, 0.75), gamma=0.1, min_factor=0.0)


def test_warmup_is_linear_then_cosine_to_floor():
    assert lr_factor(0, 0.0, decay="cosine", **KW) == pytest.approx(0.2)
    assert lr_factor(5, 0.0, decay="cosine", **KW) == pytest.approx(0.6)
    assert lr_factor(10, 0.0, decay="cosine", **KW) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, decay="cosine", **KW) == pytest.approx(0.5)
    assert lr_factor(99, 1.0, decay="cosine", **KW) == pytest.approx(0.0, abs=1e-12)
    floor = dict(KW, min_factor=0.1)
    assert lr_factor(99, 1.0, decay="cosine", **floor) == pytest.approx(0.1)
    values = [lr_factor(s, s / 100, decay="cosine", **KW) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_step_decay_at_budget_fractions_and_constant():
    assert lr_factor(20, 0.49, decay="step", **KW) == pytest.approx(1.0)
    assert lr_factor(20, 0.5, decay="step", **KW) == pytest.approx(0.1)
    assert lr_factor(20, 0.8, decay="step", **KW) == pytest.approx(0.01)
    assert lr_factor(20, 0.8, decay="none", **KW) == 1.0


def test_budget_progress_takes_the_binding_budget():
    assert budget_progress(50, 10, 10, 0.0, 0.0) == pytest.approx(0.5)
    assert budget_progress(50, 10, 10, 90.0, 100.0) == pytest.approx(0.9)
    assert budget_progress(500, 10, 10, 1.0, 100.0) == 1.0
    assert math.isclose(budget_progress(0, 10, 10, 0.0, 100.0), 0.0)
    # a step budget shorter than the epoch cap is the one that binds
    assert budget_progress(50, 10, 10, 0.0, 0.0, max_steps=200) == pytest.approx(0.5)
    assert budget_progress(50, 10, 10, 0.0, 0.0, max_steps=10**6) == pytest.approx(0.5)
    assert total_steps(10, 10, 0) == 100 and total_steps(10, 10, 30) == 30
