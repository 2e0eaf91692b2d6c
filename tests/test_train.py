"""Training functions: dev split, label statistics, augmentation, train_step, evaluate, fit.

Fixtures are tiny EMT-labelled Cu slabs with an adsorbate (13-14 atoms, cutoff 4 Å), built
through the real path Frame -> sample_from_atoms -> collate. ``make_samples`` and
``TINY_GNS`` are shared with ``test_resume.py`` and ``test_ddp.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from tiny import fit_split, tiny_kwargs
from torch import nn
from torch.utils.data import DataLoader

from forcenet import checkpoint as C
from forcenet import train as T
from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.dataset import sample_from_atoms
from forcenet.data.frame import Frame
from forcenet.data.graphs import GraphSettings
from forcenet.losses import TrainLoss
from forcenet.scaling import label_stats
from forcenet.train.data import dev_split

CUTOFF = 4.0
MAX_NEIGHBORS = 16
GRAPH = GraphSettings(cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
TINY_GNS = tiny_kwargs("gns", hidden_channels=16, mlp_layers=1, cutoff=CUTOFF)


def make_frames(n_systems: int = 6, frames_per_system: int = 4, seed: int = 0) -> list[Frame]:
    """EMT-labelled slabs: Cu(111) 2x2x3 + H or O, bottom layer fixed (tag 0)."""
    rng = np.random.default_rng(seed)
    frames = []
    for sid in range(n_systems):
        slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
        slab.pbc = True
        add_adsorbate(slab, "H" if sid % 2 else "O", 1.5, "fcc")
        z = slab.positions[:, 2]
        fixed = z < z.min() + 0.5
        tags = np.where(fixed, 0, 1)
        tags[-1] = 2
        for fid in range(frames_per_system):
            atoms = slab.copy()
            atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
            atoms.calc = EMT()
            frames.append(
                Frame(
                    atomic_numbers=atoms.numbers.astype(np.int64),
                    pos=atoms.positions.copy(),
                    cell=np.array(atoms.cell),
                    pbc=atoms.pbc.copy(),
                    tags=tags.astype(np.int64),
                    fixed=fixed.copy(),
                    forces=atoms.get_forces(),
                    total_energy=float(atoms.get_potential_energy()),
                    reference_energy=0.0,
                    sid=sid,
                    fid=fid,
                )
            )
    return frames


def make_samples(n_systems: int = 6, frames_per_system: int = 4, seed: int = 0) -> list[dict]:
    """:func:`make_frames` with their graphs (cutoff 4 Å, 16 neighbours)."""
    return [
        sample_from_atoms(f, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS)
        for f in make_frames(n_systems, frames_per_system, seed)
    ]


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples()


def tiny_config(**overrides) -> T.TrainConfig:
    base = dict(
        lr=3e-3,
        warmup_steps=2,
        batch_size=4,
        eval_batch_size=5,
        max_epochs=2,
        dev_fraction=0.2,
        amp=False,
    )
    base.update(overrides)
    return T.TrainConfig(**base)


def plain_loss(**overrides) -> TrainLoss:
    base = dict(
        kind="l1",
        atoms="tag_weighted",
        tag_weights=(0.05, 1.0, 1.0),
        force_coef=1.0,
        energy_coef=0.0,
        force_scale=1.0,
        energy_shift=0.0,
        energy_scale=1.0,
    )
    base.update(overrides)
    return TrainLoss(**base)


# ----------------------------------------------------------------------------- data helpers


def test_dev_split_holds_out_whole_systems_deterministically():
    sids = [s for s in range(200) for _ in range(3)]
    train, dev = dev_split(sids, 0.1, seed=0)
    assert sorted(train + dev) == list(range(len(sids)))
    dev_sids, train_sids = {sids[i] for i in dev}, {sids[i] for i in train}
    assert not dev_sids & train_sids
    assert 8 <= len(dev_sids) <= 35  # ~10 % of 200 systems
    assert dev_split(sids, 0.1, seed=0) == (train, dev)
    assert dev_split(sids, 0.1, seed=1)[1] != dev
    # a system's membership does not depend on the other systems present
    half = [s for s in sids if s < 100]
    assert {half[i] for i in dev_split(half, 0.1, 0)[1]} == {s for s in dev_sids if s < 100}
    assert dev_split([5, 5, 7], 0.01, 0)[1]  # at least one system held out


def test_label_stats_match_numpy(samples):
    stats = label_stats(samples)
    forces = np.concatenate([s[K.FORCES][~s[K.FIXED]] for s in samples]).astype(np.float64)
    energies = np.array([float(s[K.ENERGY]) for s in samples])
    assert stats["force_rms"] == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-6)
    assert stats["energy_mean"] == pytest.approx(energies.mean())
    assert stats["energy_std"] == pytest.approx(energies.std())


# ----------------------------------------------------------------------------- steps


class ConstantForces(nn.Module):
    """Predicts the same force vector for every atom (a stand-in with a known output)."""

    energy_from_gradient = False

    def __init__(self, value: tuple[float, float, float]) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, batch):
        return {K.OUT_FORCES: self.value.expand(batch[K.POS].shape[0], 3)}


def test_evaluate_exact_sums_over_free_atoms_independent_of_batching(samples):
    model = ConstantForces((0.1, -0.2, 0.0))
    by_one = T.evaluate(model, DataLoader(samples, batch_size=1, collate_fn=collate), device="cpu")
    by_seven = T.evaluate(
        model, DataLoader(samples, batch_size=7, collate_fn=collate), device="cpu"
    )
    free_f = np.concatenate([s[K.FORCES][~s[K.FIXED]] for s in samples]).astype(np.float64)
    expected = np.abs(free_f - np.array([0.1, -0.2, 0.0])).mean()
    assert by_one["forces_mae"] == pytest.approx(expected, rel=1e-6)
    assert by_seven["forces_mae"] == pytest.approx(expected, rel=1e-6)
    assert by_one["zero_forces_mae"] == pytest.approx(np.abs(free_f).mean(), rel=1e-6)
    assert by_one["num_free_atoms"] == len(free_f)
    assert by_one["num_structures"] == len(samples)


def test_train_step_learns_one_batch(samples):
    """Loss falls and the fit beats predicting zero (EMT forces from 0.08 Å rattles are
    hard for a tiny net: a full overfit takes far more steps than a unit test can afford)."""
    torch.manual_seed(0)
    model = C.build_scaled_model("gns", TINY_GNS)
    batch = collate(samples[:4])
    rms = float(batch[K.FORCES][~batch[K.FIXED]].square().mean().sqrt())
    model.force_scale.fill_(rms)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = plain_loss(force_scale=rms, kind="l2")
    losses = [train_step_loss(model, batch, opt, loss_fn) for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.92 * losses[0]
    free = ~batch[K.FIXED]
    with torch.no_grad():
        err = (model(batch)[K.OUT_FORCES] - batch[K.FORCES])[free].square().mean()
    assert float(err) < 0.97 * float(batch[K.FORCES][free].square().mean())


def train_step_loss(model, batch, opt, loss_fn) -> float:
    return T.train_step(model, batch, opt, loss_fn=loss_fn, clip_grad=10.0)["loss"]


def test_train_step_clips_gradient_and_rejects_nan(samples):
    torch.manual_seed(0)
    model = C.build_scaled_model("gns", TINY_GNS)
    batch = collate(samples[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    T.train_step(model, batch, opt, loss_fn=plain_loss(), clip_grad=1e-3)
    total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)
    bad = dict(batch, **{K.FORCES: torch.full_like(batch[K.FORCES], float("nan"))})
    with pytest.raises(FloatingPointError):
        T.train_step(model, bad, opt, loss_fn=plain_loss())


# ----------------------------------------------------------------------------- fit


def test_fit_writes_checkpoints_and_learns(samples, tmp_path):
    torch.manual_seed(0)
    seen = []
    cfg = tiny_config(max_epochs=3, force_loss="l2", lr=5e-3)
    path = fit_split(
        cfg,
        "gns",
        TINY_GNS,
        samples,
        tmp_path,
        graph=GRAPH,
        train=20,
        params_snapshot={"train": {"lr": 5e-3}},
        on_epoch_end=lambda step, m: seen.append((step, m)),
    )
    assert path == tmp_path / "best.pt" and (tmp_path / "last.pt").is_file()
    assert [s for s, _ in seen] == [5, 10, 15]  # 20 frames / batch 4
    assert [m["epoch"] for _, m in seen] == [1.0, 2.0, 3.0]
    assert [m["graphs_seen"] for _, m in seen] == [20.0, 40.0, 60.0]
    assert all(math.isfinite(m["forces_mae"]) for _, m in seen)
    assert seen[-1][1]["forces_mae"] < seen[0][1]["zero_forces_mae"]  # learned something
    assert not list(tmp_path.glob("*.tmp"))
    model, ckpt = C.load_model(tmp_path / "last.pt")
    assert ckpt["step"] == 15 and ckpt["epoch"] == 3 and ckpt["graph"] == GRAPH.as_dict()
    assert ckpt["params"] == {"train": {"lr": 5e-3}}
    assert ckpt["best_metric"] == min(m["forces_mae"] for _, m in seen)
    # the rebuilt model predicts physical units: same dev MAE as measured during training
    dev = T.evaluate(
        model, DataLoader(samples[20:], batch_size=3, collate_fn=collate), device="cpu"
    )
    assert dev["forces_mae"] == pytest.approx(seen[-1][1]["forces_mae"], rel=1e-5)
    rms = label_stats(samples[:20])["force_rms"]
    assert float(model.force_scale) == pytest.approx(rms, rel=1e-6)


def test_fit_stops_at_wall_clock_budget(samples, tmp_path, monkeypatch):
    ticks = iter(range(10_000))
    monkeypatch.setattr(T.loop, "_now", lambda: float(next(ticks)))  # one "second" per clock read
    seen = []
    cfg = tiny_config(max_epochs=50, time_budget_s=12.0)
    fit_split(
        cfg,
        "gns",
        TINY_GNS,
        samples,
        tmp_path,
        graph=GRAPH,
        train=20,
        on_epoch_end=lambda e, m: seen.append(m),
    )
    ckpt = C.load_checkpoint(tmp_path / "last.pt")
    assert 0 < ckpt["step"] < 50 * 5  # stopped long before the epoch budget
    assert ckpt["train_info"]["progress"]["elapsed_s"] >= 12.0
    assert seen[-1]["step"] == ckpt["step"]


def test_energy_model_trains_with_energy_and_force_loss(samples, tmp_path):
    kwargs = {
        "hidden_channels": 8,
        "num_filters": 8,
        "num_interactions": 1,
        "num_gaussians": 8,
        "cutoff": CUTOFF,
    }
    cfg = tiny_config(
        max_epochs=1, energy_coef=1.0, force_coef=10.0, loss_atoms="free", rotation_augment=False
    )
    fit_split(cfg, "schnet", kwargs, samples, tmp_path, graph=GRAPH, train=8, dev=samples[20:])
    model, ckpt = C.load_model(tmp_path / "last.pt")
    assert model.energy_from_gradient
    assert float(model.force_scale) == float(model.energy_scale)  # F = -dE/dx stays exact
    stats = label_stats(samples[:8], reference="per_element")  # the library default
    assert float(model.energy_shift) == pytest.approx(stats["energy_mean"], rel=1e-6, abs=1e-9)
    metrics = T.evaluate(
        model, DataLoader(samples[20:], batch_size=4, collate_fn=collate), device="cpu"
    )
    assert math.isfinite(metrics["energy_mae"])


def test_fit_refuses_resume_of_another_model(samples, tmp_path):
    cfg = tiny_config(max_epochs=1)
    fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=8, dev=samples[20:])
    other = dict(TINY_GNS, hidden_channels=8)
    with pytest.raises(C.CheckpointError, match="cannot resume"):
        fit_split(
            cfg,
            "gns",
            other,
            samples,
            tmp_path,
            graph=GRAPH,
            train=8,
            dev=samples[20:],
            resume=True,
        )


# ----------------------------------------------------------------------------- checkpoints


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(C.CheckpointError, match="junk.pt"):
        C.load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(C.CheckpointError, match="plain.pt.*missing keys"):
        C.load_checkpoint(plain)
    code = tmp_path / "code.pt"
    torch.save({"obj": Path("x")}, code)  # an arbitrary object: refused by weights_only
    with pytest.raises(C.CheckpointError, match="code.pt"):
        C.load_checkpoint(code)


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "last.pt"
    good = {k: 0 for k in C.REQUIRED_KEYS} | {"format_version": 1, "graph": GRAPH.as_dict()}
    C.save_checkpoint(path, good)
    before = path.read_bytes()
    bad = dict(good, model_state=lambda: None)  # not serialisable: torch.save raises
    with pytest.raises(Exception):  # noqa: B017, PT011
        C.save_checkpoint(path, bad)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_scaled_model_outputs_physical_units(samples):
    torch.manual_seed(0)
    inner = C.build_model("gns", TINY_GNS)
    scaled = C.ScaledModel(inner, force_scale=2.5, energy_scale=3.0, energy_shift=-1.0)
    batch = collate(samples[:2])
    assert torch.allclose(scaled(batch)[K.OUT_FORCES], 2.5 * inner(batch)[K.OUT_FORCES])
    with pytest.raises(ValueError, match="force_scale == energy_scale"):
        C.ScaledModel(
            C.build_model(
                "schnet",
                {
                    "hidden_channels": 8,
                    "num_filters": 8,
                    "num_interactions": 1,
                    "num_gaussians": 8,
                    "cutoff": CUTOFF,
                },
            ),
            force_scale=2.0,
            energy_scale=1.0,
        )


def test_dev_evaluate_reports_surface_and_adsorbate_atoms(samples):
    """T.evaluate: the per-tag dev MAEs are the means over free atoms of that tag."""
    torch.manual_seed(0)
    model = C.ScaledModel(C.build_model("gns", TINY_GNS)).eval()
    got = T.evaluate(model, DataLoader(samples[:6], batch_size=4, collate_fn=collate), device="cpu")
    batch = collate(samples[:6])
    with torch.no_grad():
        pred = model(batch)[K.OUT_FORCES].double()
    err, f = (pred - batch[K.FORCES].double()).abs(), batch[K.FORCES].double().abs()
    for name, tag in (("surface", 1), ("adsorbate", 2)):
        sel = ~batch[K.FIXED] & (batch[K.TAGS] == tag)
        assert got[f"forces_mae_{name}"] == pytest.approx(float(err[sel].mean()), rel=1e-9)
        assert got[f"zero_forces_mae_{name}"] == pytest.approx(float(f[sel].mean()), rel=1e-9)
    assert got["forces_mae"] == pytest.approx(float(err[~batch[K.FIXED]].mean()), rel=1e-9)


def test_first_graphs_equals_collating_fewer_samples(samples):
    from forcenet.data.batch import first_graphs

    whole, part = collate(samples[:5]), collate(samples[:3])
    got = first_graphs(whole, 3)
    assert got.keys() == part.keys()
    for key in part:
        assert torch.equal(got[key], part[key]), key
    assert first_graphs(whole, 9) is whole
