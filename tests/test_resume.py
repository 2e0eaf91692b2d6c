"""Exact resume: a run killed after an epoch, or stopped by its wall-clock budget inside an
epoch, and resumed reaches the same weights as an uninterrupted run (CPU, one thread)."""

from __future__ import annotations

import pytest
import torch
from test_train import GRAPH, TINY_GNS, make_samples, tiny_config
from tiny import fit_split

from forcenet import checkpoint as C
from forcenet import train as T


class Killed(RuntimeError):
    """Raised from the epoch callback to simulate a crash right after a checkpoint."""


@pytest.fixture(scope="module")
def samples():
    return make_samples(n_systems=5, frames_per_system=4, seed=3)


def _fit(cfg, samples, out, *, resume=False, on_epoch_end=None):
    return fit_split(
        cfg, "gns", TINY_GNS, samples, out, graph=GRAPH, resume=resume, on_epoch_end=on_epoch_end
    )


def _weights(path):
    return C.load_checkpoint(path)["model_state"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_kill_after_epoch_then_resume_matches_uninterrupted(samples, tmp_path):
    cfg = tiny_config(max_epochs=3, rotation_augment=True, lr_decay="cosine", warmup_steps=3)
    _fit(cfg, samples, tmp_path / "full")

    def crash(step, metrics):
        if step == 4:  # right after the first epoch's checkpoint
            raise Killed

    with pytest.raises(Killed):
        _fit(cfg, samples, tmp_path / "cut", on_epoch_end=crash)
    assert C.load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    seen = []
    _fit(cfg, samples, tmp_path / "cut", resume=True, on_epoch_end=lambda e, m: seen.append(e))
    assert seen == [8, 12]  # epochs continue (4 steps each), the first is not repeated
    full = C.load_checkpoint(tmp_path / "full" / "last.pt")
    cut = C.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert cut["step"] == full["step"] == 12 and cut["epoch"] == 3
    _assert_same(full["model_state"], cut["model_state"])
    assert cut["best_metric"] == pytest.approx(full["best_metric"], abs=1e-7)
    # a resumed run's optimizer state continues too
    s_full, s_cut = full["optimizer_state"]["state"], cut["optimizer_state"]["state"]
    assert torch.allclose(s_full[0]["exp_avg_sq"], s_cut[0]["exp_avg_sq"], atol=1e-9)


def test_budget_stop_inside_epoch_then_resume_matches(samples, tmp_path, monkeypatch):
    """The budget ends mid-epoch; resuming skips exactly the batches already trained on.

    Constant LR after warm-up so the schedule does not depend on the budget."""
    cfg = tiny_config(max_epochs=2, lr_decay="none", warmup_steps=2)
    _fit(cfg, samples, tmp_path / "full")
    ticks = iter(range(100_000))
    monkeypatch.setattr(T.loop, "_now", lambda: float(next(ticks)))  # one "second" per clock read
    stop = T.TrainConfig(**{**cfg.__dict__, "time_budget_s": 6.0})
    _fit(stop, samples, tmp_path / "cut")
    cut = C.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert 0 < cut["train_info"]["progress"]["batches_in_epoch"] < 4  # inside epoch 1
    assert cut["epoch"] == 0
    monkeypatch.setattr(T.loop, "_now", lambda: 0.0)
    _fit(cfg, samples, tmp_path / "cut", resume=True)
    full = C.load_checkpoint(tmp_path / "full" / "last.pt")
    resumed = C.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert resumed["step"] == full["step"] == 8
    _assert_same(full["model_state"], resumed["model_state"])
