"""Training options: the weight average (``ema_decay``), frame averaging in training
(``frame_averaging``) and the conservative phase's own schedule (``conservative_lr``)."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import GRAPH, TINY_GNS, make_samples, tiny_config
from tiny import fit_split
from torch.utils.data import DataLoader

from forcenet import checkpoint as C
from forcenet import train as T
from forcenet.data.batch import collate
from forcenet.scaling import ScaledModel
from forcenet.train.conservative import learning_rate
from forcenet.train.ema import WeightAverage
from forcenet.train.state import TRAINED_STATE


class Killed(RuntimeError):
    """Raised from the evaluation callback: a crash right after a checkpoint."""


@pytest.fixture(scope="module")
def samples():
    return make_samples(n_systems=5, frames_per_system=4, seed=3)


def _fit(cfg, samples, out, **options):
    return fit_split(cfg, "gns", TINY_GNS, samples, out, graph=GRAPH, **options)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _killed_and_resumed(cfg, samples, tmp_path, kill_at: int) -> tuple[dict, dict]:
    """last.pt of an uninterrupted run, and of one killed after step ``kill_at``'s
    checkpoint and resumed."""
    _fit(cfg, samples, tmp_path / "full")

    def crash(step, metrics):
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        _fit(cfg, samples, tmp_path / "cut", on_epoch_end=crash)
    _fit(cfg, samples, tmp_path / "cut", resume=True)
    return (C.load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "cut"))


def test_weight_average_follows_the_weights_with_its_decay():
    torch.manual_seed(0)
    model = ScaledModel(torch.nn.Linear(3, 2))
    average = WeightAverage(model, decay=0.75)
    before = [p.detach().clone() for p in average.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    for a, b, w in zip(average.model.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(a, 0.75 * b + 0.25 * w)
    assert not any(p.requires_grad for p in average.model.parameters())


def test_ema_checkpoint_holds_the_average_and_resumes_exactly(samples, tmp_path):
    cfg = tiny_config(max_epochs=3, ema_decay=0.8, rotation_augment=True)
    seen: list = []
    _fit(cfg, samples, tmp_path / "one", on_epoch_end=lambda s, m: seen.append(m))
    ckpt = C.load_checkpoint(tmp_path / "one" / "last.pt")
    assert not _same(ckpt["model_state"], ckpt[TRAINED_STATE])  # the average is not the weights
    # the dev metric of each evaluation is that of the averaged model the checkpoint holds
    model, _ = C.load_model(tmp_path / "one" / "last.pt")
    dev = DataLoader(samples[16:], batch_size=5, collate_fn=collate)
    assert T.evaluate(model, dev, device="cpu")["forces_mae"] == pytest.approx(
        seen[-1]["forces_mae"], rel=1e-6
    )
    full, cut = _killed_and_resumed(cfg, samples, tmp_path, kill_at=4)
    assert _same(full["model_state"], cut["model_state"])
    assert _same(full[TRAINED_STATE], cut[TRAINED_STATE])


def test_ema_off_writes_no_second_state(samples, tmp_path):
    _fit(tiny_config(max_epochs=1), samples, tmp_path)
    assert TRAINED_STATE not in C.load_checkpoint(tmp_path / "last.pt")


def test_resuming_with_ema_needs_an_average_in_the_checkpoint(samples, tmp_path):
    _fit(tiny_config(max_epochs=1), samples, tmp_path)
    with pytest.raises(C.CheckpointError, match=r"train\.ema_decay 0\.0 -> 0\.9"):
        _fit(tiny_config(max_epochs=2, ema_decay=0.9), samples, tmp_path, resume=True)
    with pytest.raises(C.CheckpointError, match="without a weight average"):
        _fit(
            tiny_config(max_epochs=2, ema_decay=0.9),
            samples,
            tmp_path,
            resume=True,
            allow_changed=True,  # even on purpose
        )


def test_stochastic_frame_averaging_trains_and_resumes_exactly(samples, tmp_path):
    cfg = tiny_config(max_epochs=3, frame_averaging="stochastic", rotation_augment=False)
    full, cut = _killed_and_resumed(cfg, samples, tmp_path, kill_at=4)
    assert full["frame_averaging"] == "stochastic"
    assert _same(full["model_state"], cut["model_state"])
    plain = tiny_config(max_epochs=3, rotation_augment=False)
    _fit(plain, samples, tmp_path / "plain")
    assert not _same(
        C.load_checkpoint(tmp_path / "plain" / "last.pt")["model_state"], full["model_state"]
    )


def test_conservative_phase_has_its_own_schedule():
    cfg = T.TrainConfig(
        max_steps=100,
        conservative_finetune_steps=40,
        conservative_lr=1e-3,
        conservative_warmup_steps=10,
        warmup_start=0.1,
        min_lr_factor=0.02,
    )

    def lr(step: int) -> float:
        return learning_rate(
            cfg, step, step / 100, conservative=step >= 60, switch_at=60, budget=100
        )

    assert lr(59) == pytest.approx(cfg.schedule.lr_at(59, 0.59))  # the direct phase's
    assert lr(60) == pytest.approx(1e-4)  # warm-up from warmup_start x conservative_lr
    assert lr(70) == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lr(100) == pytest.approx(2e-5)  # annealed to its floor at the budget's end
    same = T.TrainConfig(max_steps=100, conservative_finetune_steps=40)
    assert learning_rate(same, 70, 0.7, conservative=True, switch_at=60, budget=100) == (
        same.schedule.lr_at(70, 0.7)
    )
