"""OC20 metrics against numpy values computed independently, batch by batch; ADwT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from forcenet.data import keys as K
from forcenet.metrics import ADWT_THRESHOLDS, STATE_SIZE, OC20Metrics, adwt, mean_free_distance


def _make(natoms: list[int], seed: int, with_energy: bool = True):
    rng = np.random.default_rng(seed)
    n = sum(natoms)
    f_true = rng.normal(size=(n, 3))
    f_pred = f_true + rng.normal(scale=0.3, size=(n, 3))
    fixed = rng.random(n) < 0.3
    batch = {
        K.FORCES: torch.tensor(f_true, dtype=torch.float32),
        K.FIXED: torch.tensor(fixed),
        K.NATOMS: torch.tensor(natoms),
        K.BATCH: torch.repeat_interleave(torch.arange(len(natoms)), torch.tensor(natoms)),
        K.ENERGY: torch.tensor(rng.normal(size=len(natoms)), dtype=torch.float32),
    }
    pred = {K.OUT_FORCES: torch.tensor(f_pred, dtype=torch.float32)}
    if with_energy:
        pred[K.OUT_ENERGY] = batch[K.ENERGY] + torch.tensor(rng.normal(scale=0.5, size=len(natoms)))
    return pred, batch


def _numpy_reference(preds, batches) -> dict[str, float]:
    """The metrics written out with numpy over the concatenated data."""
    f_hat = np.concatenate([p[K.OUT_FORCES].double().numpy() for p in preds])
    f = np.concatenate([b[K.FORCES].double().numpy() for b in batches])
    free = ~np.concatenate([b[K.FIXED].numpy() for b in batches])
    d = np.abs(f_hat - f)[free]
    cos = [
        np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
        for a, b in zip(f_hat[free], f[free], strict=True)
    ]
    return {
        "forces_mae": d.mean(),
        "forcesx_mae": d[:, 0].mean(),
        "forcesy_mae": d[:, 1].mean(),
        "forcesz_mae": d[:, 2].mean(),
        "zero_forces_mae": np.abs(f[free]).mean(),
        "forces_cos": float(np.mean(cos)),
        "forces_magnitude": np.abs(
            np.linalg.norm(f_hat[free], axis=1) - np.linalg.norm(f[free], axis=1)
        ).mean(),
        "num_free_atoms": float(free.sum()),
    }


def test_force_metrics_match_numpy_across_batches():
    data = [_make([3, 5], 0), _make([4], 1), _make([2, 6, 1], 2)]
    m = OC20Metrics()
    for pred, batch in data:
        m.update(pred, batch)
    got = m.compute()
    ref = _numpy_reference([p for p, _ in data], [b for _, b in data])
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert got["num_structures"] == 6
    # energy MAE over all structures
    e_err = np.concatenate(
        [(p[K.OUT_ENERGY].double() - b[K.ENERGY].double()).abs().numpy() for p, b in data]
    )
    assert got["energy_mae"] == pytest.approx(e_err.mean(), rel=1e-6)


def test_zero_prediction_gives_zero_baseline_and_fixed_atoms_are_ignored():
    pred, batch = _make([5, 5], 3, with_energy=False)
    pred = {K.OUT_FORCES: torch.zeros_like(batch[K.FORCES])}
    # Huge labels on fixed atoms must not move any metric.
    batch[K.FORCES][batch[K.FIXED]] = 1e6
    m = OC20Metrics()
    m.update(pred, batch)
    got = m.compute()
    assert got["forces_mae"] == pytest.approx(got["zero_forces_mae"], rel=1e-12)
    free = ~batch[K.FIXED]
    assert got["zero_forces_mae"] == pytest.approx(
        batch[K.FORCES][free].abs().mean().item(), rel=1e-6
    )
    assert "energy_mae" not in got and "energy_force_within_threshold" not in got


def test_efwt_strict_thresholds_by_hand():
    # Three structures of two atoms each; atom 1 of structure 2 is fixed.
    f = torch.zeros(6, 3)
    f_hat = torch.zeros(6, 3)
    f_hat[0, 0] = 0.01  # structure 0: max |dF| 0.01 < 0.03, |dE| 0.01 -> hit
    f_hat[2, 1] = 0.05  # structure 1: force error 0.05 -> miss
    f_hat[5, 2] = 5.0  # structure 2: big error only on a fixed atom -> ignored
    batch = {
        K.FORCES: f,
        K.FIXED: torch.tensor([False, False, False, False, False, True]),
        K.NATOMS: torch.tensor([2, 2, 2]),
        K.BATCH: torch.tensor([0, 0, 1, 1, 2, 2]),
        K.ENERGY: torch.tensor([0.0, 0.0, 1.0]),
    }
    pred = {K.OUT_FORCES: f_hat, K.OUT_ENERGY: torch.tensor([0.01, 0.0, 1.0 + 0.025])}
    m = OC20Metrics()
    m.update(pred, batch)
    got = m.compute()
    # structure 2 fails only through its energy (0.025 >= 0.02)
    assert got["energy_force_within_threshold"] == pytest.approx(1 / 3)
    assert got["energy_mae"] == pytest.approx((0.01 + 0.0 + 0.025) / 3, rel=1e-5)
    pred[K.OUT_ENERGY] = torch.tensor([0.01, 0.0, 1.0])
    m.reset()
    m.update(pred, batch)
    assert m.compute()["energy_force_within_threshold"] == pytest.approx(2 / 3)
    # exactly at the force threshold is a miss (strict <)
    f_hat64 = f_hat.double()
    f_hat64[0, 0] = 0.03
    m.reset()
    m.update({K.OUT_FORCES: f_hat64, K.OUT_ENERGY: pred[K.OUT_ENERGY].double()}, batch)
    assert m.compute()["energy_force_within_threshold"] == pytest.approx(1 / 3)


def test_state_merge_equals_single_pass_and_load_state():
    data = [_make([3, 4], 10), _make([7], 11)]
    whole, a, b = OC20Metrics(), OC20Metrics(), OC20Metrics()
    for pred, batch in data:
        whole.update(pred, batch)
    a.update(*data[0])
    b.update(*data[1])
    # what an all-reduce would do: sum the state vectors
    c = OC20Metrics()
    c.load_state(a.state() + b.state())
    a.merge(b)
    for key, value in whole.compute().items():
        assert a.compute()[key] == pytest.approx(value, rel=1e-12)
        assert c.compute()[key] == pytest.approx(value, rel=1e-12)
    assert whole.state().shape == (STATE_SIZE,)
    with pytest.raises(ValueError, match="shape"):
        c.load_state(torch.zeros(3))


def test_empty_accumulator_gives_nan_not_zero():
    got = OC20Metrics().compute()
    assert math.isnan(got["forces_mae"]) and got["num_structures"] == 0


def _with_tags(pred, batch, seed, z_ads=(1, 8)):
    rng = np.random.default_rng(seed)
    n = batch[K.FORCES].shape[0]
    tags = rng.integers(0, 3, n)
    batch = dict(
        batch,
        **{
            K.TAGS: torch.tensor(tags),
            K.ATOMIC_NUMBERS: torch.tensor(np.where(tags == 2, rng.choice(z_ads, n), 29)),
        },
    )
    return pred, batch


def test_per_tag_and_per_element_metrics_match_numpy():
    data = [_with_tags(*_make([5, 7], s), s) for s in range(3)]
    m = OC20Metrics()
    for pred, batch in data:
        m.update(pred, batch)
    got = m.compute()
    f_hat = np.concatenate([p[K.OUT_FORCES].double().numpy() for p, _ in data])
    f = np.concatenate([b[K.FORCES].double().numpy() for _, b in data])
    free = ~np.concatenate([b[K.FIXED].numpy() for _, b in data])
    tags = np.concatenate([b[K.TAGS].numpy() for _, b in data])
    z = np.concatenate([b[K.ATOMIC_NUMBERS].numpy() for _, b in data])
    for name, tag in (("surface", 1), ("adsorbate", 2)):
        sel = free & (tags == tag)
        assert got[f"forces_mae_{name}"] == pytest.approx(np.abs(f_hat - f)[sel].mean())
        assert got[f"zero_forces_mae_{name}"] == pytest.approx(np.abs(f[sel]).mean())
        cos = (
            (f_hat[sel] * f[sel]).sum(1)
            / np.linalg.norm(f_hat[sel], axis=1)
            / np.linalg.norm(f[sel], axis=1)
        )
        assert got[f"forces_cos_{name}"] == pytest.approx(cos.mean())
        assert got[f"num_free_atoms_{name}"] == sel.sum()
    for sym, zz in (("H", 1), ("O", 8)):
        sel = free & (tags == 2) & (z == zz)
        assert got[f"forces_mae_adsorbate_{sym}"] == pytest.approx(np.abs(f_hat - f)[sel].mean())
        assert got[f"zero_forces_mae_adsorbate_{sym}"] == pytest.approx(np.abs(f[sel]).mean())
    assert "forces_mae_adsorbate_Cu" not in got  # metal atoms are never adsorbate here
    # the overall figures are unchanged by the tags
    plain = OC20Metrics()
    for pred, batch in data:
        plain.update(pred, {k: v for k, v in batch.items() if k != K.TAGS})
    assert plain.compute()["forces_mae"] == pytest.approx(got["forces_mae"], rel=1e-12)
    assert "forces_mae_surface" not in plain.compute()


def test_data_without_adsorbate_tags_report_overall_only():
    pred, batch = _make([6, 4], 5)
    batch = dict(
        batch, **{K.TAGS: torch.ones(10, dtype=torch.long), K.ATOMIC_NUMBERS: torch.full((10,), 6)}
    )
    m = OC20Metrics()
    m.update(pred, batch)
    got = m.compute()
    assert math.isfinite(got["forces_mae"])
    assert not [k for k in got if k.endswith(("_surface", "_adsorbate")) or "_adsorbate_" in k]


# --------------------------------------------------------------------------- ADwT


def _cell_and_positions(n: int = 6, seed: int = 0):
    cell = np.array([[5.0, 0.0, 0.0], [2.5, 4.33, 0.0], [0.0, 0.0, 20.0]])
    pos = np.random.default_rng(seed).uniform(0, 1, (n, 3)) @ cell
    free = np.array([True, True, True, False, True, False])[:n]
    return cell, pos, free


def test_adwt_thresholds_are_oc20s():
    assert len(ADWT_THRESHOLDS) == 490  # 0.010, 0.011, ..., 0.499 Å
    assert ADWT_THRESHOLDS[0] == pytest.approx(0.01) and ADWT_THRESHOLDS[-1] == pytest.approx(0.499)


def test_adwt_identical_is_one():
    cell, pos, free = _cell_and_positions()
    assert adwt(pos, pos.copy(), cell, [True, True, False], free) == 1.0


def test_adwt_lattice_vector_shift_is_minimum_image():
    cell, pos, free = _cell_and_positions()
    shifted = pos + cell[0] - 2 * cell[1]  # same periodic structure
    assert mean_free_distance(shifted, pos, cell, [True, True, False], free) < 1e-9
    assert adwt(shifted, pos, cell, [True, True, False], free) == 1.0
    # Along a non-periodic axis the same kind of shift is a real 20 Å displacement.
    lifted = pos + cell[2]
    assert adwt(lifted, pos, cell, [True, True, False], free) == 0.0


def test_adwt_displacement_gives_fraction_of_thresholds_above_it():
    cell, pos, free = _cell_and_positions()
    step = np.array([0.6, -0.8, 0.0]) * 0.1005  # |step| = 0.1005 Å
    moved = pos + step
    moved[~free] += 3.0  # fixed atoms do not count
    assert mean_free_distance(moved, pos, cell, [True, True, False], free) == (
        pytest.approx(0.1005)
    )
    # thresholds strictly above 0.1005: 0.101 .. 0.499 -> 399 of 490
    assert adwt(moved, pos, cell, [True, True, False], free) == pytest.approx(399 / 490)
    # Across the cell boundary: a 0.1005 Å move that wrapped the atom to the other side.
    wrapped = moved.copy()
    wrapped[0] -= cell[0]
    assert adwt(wrapped, pos, cell, [True, True, False], free) == pytest.approx(399 / 490)


def test_adwt_averages_distance_over_free_atoms_only():
    cell, pos, free = _cell_and_positions()
    moved = pos.copy()
    idx = np.flatnonzero(free)
    moved[idx[:2]] += [0.0, 0.201, 0.0]  # 2 of 4 free atoms -> mean 0.1005
    assert adwt(moved, pos, cell, [True, True, False], free) == pytest.approx(399 / 490)
    with pytest.raises(ValueError, match="free atom"):
        adwt(pos, pos, cell, [True] * 3, np.zeros(len(pos), bool))
