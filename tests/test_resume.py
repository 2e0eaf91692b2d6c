"""Exact resume: a run killed after an epoch, or stopped by its wall-clock budget inside an
epoch, and resumed reaches the same weights as an uninterrupted run (CPU, one thread); a
resume with other settings or data is refused unless allowed."""

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


def _fit(cfg, samples, out, *, resume=False, on_epoch_end=None, allow_changed=False):
    return fit_split(
        cfg,
        "gns",
        TINY_GNS,
        samples,
        out,
        graph=GRAPH,
        resume=resume,
        on_epoch_end=on_epoch_end,
        allow_changed=allow_changed,
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


# ------------------------------------------------------------ a resume of the same run only


def test_resume_with_other_settings_or_data_is_refused_naming_the_keys(samples, tmp_path):
    """A resume continues the run it was started as: changed training settings, model
    kwargs or training frames are refused before any work, each differing key named; the
    worker count and the dev batch size may change."""
    cfg = tiny_config(max_epochs=2, lr_decay="none")
    _fit(tiny_config(max_epochs=1, lr_decay="none"), samples, tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    changes = {
        "lr": ({"lr": 1e-3}, "train.lr 0.003 -> 0.001"),
        "batch": ({"batch_size": 2}, "train.batch_size 4 -> 2"),
        "seed": ({"seed": 7}, "train.seed 0 -> 7"),
        "loss": ({"force_loss": "smooth_l1"}, "train.force_loss 'l1' -> 'smooth_l1'"),
    }
    for change, named in changes.values():
        other = T.TrainConfig(**{**cfg.__dict__, "max_epochs": 1, **change})
        with pytest.raises(C.CheckpointError, match="cannot resume") as err:
            _fit(other, samples, tmp_path, resume=True)
        assert named in str(err.value) and "--allow-changed" in str(err.value)
    with pytest.raises(C.CheckpointError, match=r"data\.frames 16 -> 12") as err:
        fit_split(cfg, "gns", TINY_GNS, samples, tmp_path, graph=GRAPH, train=12, resume=True)
    assert "data.digest" in str(err.value)
    assert (tmp_path / "last.pt").read_bytes() == before  # nothing was trained or written
    free = T.TrainConfig(**{**cfg.__dict__, "max_epochs": 1, "eval_batch_size": 3})
    _fit(free, samples, tmp_path, resume=True)  # same budget reached: resumes, no step


def test_allowed_change_continues_and_becomes_the_runs_settings(samples, tmp_path, capsys):
    cfg = tiny_config(max_epochs=1, lr_decay="none")
    _fit(cfg, samples, tmp_path)
    longer = T.TrainConfig(**{**cfg.__dict__, "max_epochs": 2, "lr": 1e-3})
    _fit(longer, samples, tmp_path, resume=True, allow_changed=True)
    out = capsys.readouterr().out
    assert "resuming" in out and "train.lr 0.003 -> 0.001, train.max_epochs 1 -> 2" in out
    ckpt = C.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 8 and ckpt["run"]["train"]["lr"] == 1e-3
    assert ckpt["run"]["data"]["frames"] == 16 and ckpt["run"]["model"] == TINY_GNS


def test_checkpoint_without_run_settings_resumes_with_a_warning(samples, tmp_path, capsys):
    cfg = tiny_config(max_epochs=1)
    _fit(cfg, samples, tmp_path)
    ckpt = C.load_checkpoint(tmp_path / "last.pt")
    del ckpt["run"]  # as written before the settings were kept
    C.save_checkpoint(tmp_path / "last.pt", ckpt)
    capsys.readouterr()
    _fit(T.TrainConfig(**{**cfg.__dict__, "max_epochs": 2}), samples, tmp_path, resume=True)
    assert "predates the stored run settings" in capsys.readouterr().out
    assert C.load_checkpoint(tmp_path / "last.pt")["step"] == 8


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default(samples, tmp_path):
    """A training setting added after the checkpoint was written is no change while it
    keeps its default; set to anything else, it is named."""
    cfg = tiny_config(max_epochs=1)
    _fit(cfg, samples, tmp_path)
    ckpt = C.load_checkpoint(tmp_path / "last.pt")
    del ckpt["run"]["train"]["conservative_finetune_steps"]  # default 0
    del ckpt["run"]["train"]["lr"]  # 3e-3 here, not the default
    C.save_checkpoint(tmp_path / "last.pt", ckpt)
    with pytest.raises(C.CheckpointError, match=r"\(train\.lr \(not set\) -> 0\.003\)"):
        _fit(cfg, samples, tmp_path, resume=True)
