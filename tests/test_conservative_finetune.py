"""Conservative fine-tune of ForceNet (``TrainConfig.conservative_finetune_steps``): direct
forces first, then forces = -dE/dpos of the energy head. The checkpoint it ends with is
conservative (forces = -grad E, Jacobian asymmetry ~0 in float64, against clearly > 0
without the fine-tune), the switch keeps the energy in eV and one scale for energy and
forces, the loss falls in the conservative phase, resuming on either side of the switch
reaches the same weights, and bad settings are refused."""

from __future__ import annotations

import math

import pytest
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from test_train import CUTOFF, GRAPH, make_frames, make_samples, tiny_config
from tiny import fit_split, tiny_kwargs

from forcenet import checkpoint as C
from forcenet.data import keys as K
from forcenet.data.batch import collate
from forcenet.data.frame import Frame
from forcenet.physics.conservation import conservation_table
from forcenet.train.config import load_run_config
from forcenet.train.conservative import phase_kwargs, start_conservative_phase

KWARGS = tiny_kwargs("forcenet", cutoff=CUTOFF)
SEED = 3  # the frames of the samples below
#: 16 training frames, batch 4: 4 steps per epoch; 10 steps, the last 4 conservative, so
#: evaluations (and last.pt) at steps 4, 6 (end of the direct phase), 8 and 10.
STEPS, FINETUNE = 10, 4
SETTINGS = dict(max_steps=STEPS, max_epochs=10, lr_decay="none", warmup_steps=2)


class Killed(RuntimeError):
    """Raised from the epoch callback to simulate a crash right after a checkpoint."""


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples(n_systems=5, frames_per_system=4, seed=SEED)


def _fit(cfg, samples, out, *, resume=False, on_epoch_end=None, **options):
    return fit_split(
        cfg,
        "forcenet",
        KWARGS,
        samples,
        out,
        graph=GRAPH,
        resume=resume,
        on_epoch_end=on_epoch_end,
        **options,
    )


@pytest.fixture(scope="module")
def runs(samples, tmp_path_factory):
    """(fine-tuned run folder, the same run without the fine-tune)."""
    root = tmp_path_factory.mktemp("finetune")
    _fit(tiny_config(**SETTINGS, conservative_finetune_steps=FINETUNE), samples, root / "fine")
    _fit(tiny_config(**SETTINGS), samples, root / "direct")
    return root / "fine", root / "direct"


def _atoms(frame: Frame) -> Atoms:
    """A frame as ``ase.Atoms`` with its tags and ``FixAtoms``, for the conservation table."""
    atoms = Atoms(
        numbers=frame.atomic_numbers,
        positions=frame.pos,
        cell=frame.cell,
        pbc=frame.pbc,
        tags=frame.tags,
    )
    atoms.set_constraint(FixAtoms(mask=frame.fixed))
    return atoms


def _lambda(path) -> float:
    model, _ = C.load_model(path)
    dev = [_atoms(f) for f in make_frames(5, 4, seed=SEED)[16:18]]
    table = conservation_table(model, dev, graph=GRAPH, dtype=torch.float64, loops=1)
    assert (table["method"] == "autograd").all()
    return float(table["lambda"].max())


def test_finetuned_checkpoint_predicts_minus_grad_energy(runs, samples):
    fine, _ = runs
    model, ckpt = C.load_model(fine / "best.pt")
    assert ckpt["model_kwargs"] == {**KWARGS, "energy_head": True, "forces": "gradient"}
    assert model.energy_from_gradient and ckpt["step"] > STEPS - FINETUNE
    assert float(model.energy_scale) == float(model.force_scale)
    model = model.double()
    batch = {
        k: v.double() if v.is_floating_point() else v for k, v in collate(samples[16:18]).items()
    }
    pos = batch[K.POS].clone().requires_grad_(True)
    out = model({**batch, K.POS: pos})
    (grad,) = torch.autograd.grad(out[K.OUT_ENERGY].sum(), pos)
    torch.testing.assert_close(out[K.OUT_FORCES], -grad, rtol=1e-10, atol=1e-12)
    assert out[K.OUT_FORCES].abs().max() > 1e-3  # a real force field, not zero


def test_finetune_makes_the_forces_conservative(runs):
    fine, direct = runs
    after, before = _lambda(fine / "best.pt"), _lambda(direct / "best.pt")
    assert after < 1e-6
    assert before > 0.05
    print(f"lambda: {before:.3g} direct, {after:.3g} after the conservative fine-tune")


def test_finetune_dev_metrics_and_best_checkpoint(runs):
    fine, direct = runs
    best, last = C.load_checkpoint(fine / "best.pt"), C.load_checkpoint(fine / "last.pt")
    assert math.isfinite(best["best_metric"]) and last["step"] == STEPS
    assert best["train_info"]["metrics"]["forces_mae"] == best["best_metric"]
    # best.pt restarted with the conservative phase: it cannot come from the direct steps
    assert best["step"] in (8, 10) and last["best_metric"] == best["best_metric"]
    # without the fine-tune the kwargs stay as given (no energy head added)
    assert C.load_checkpoint(direct / "last.pt")["model_kwargs"] == KWARGS


def test_switch_keeps_energy_in_ev_and_one_scale(samples):
    cfg = tiny_config(max_steps=STEPS, conservative_finetune_steps=FINETUNE)
    torch.manual_seed(0)
    model = C.build_scaled_model(
        "forcenet", phase_kwargs(cfg, "forcenet", KWARGS, conservative=False)
    )
    for name, value in (("force_scale", 2.0), ("energy_scale", 0.5), ("energy_shift", 1.0)):
        model.get_buffer(name).fill_(value)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = collate(samples[:2])
    out = model(batch)
    (out[K.OUT_FORCES].square().sum() + out[K.OUT_ENERGY].sum()).backward()
    optimizer.step()
    energy = model.eval()(batch)[K.OUT_ENERGY].detach()
    new, new_opt = start_conservative_phase(cfg, model, optimizer, "forcenet", KWARGS)
    assert new.energy_from_gradient and not model.energy_from_gradient
    assert float(new.force_scale) == float(new.energy_scale) == 2.0
    torch.testing.assert_close(new.eval()(batch)[K.OUT_ENERGY].detach(), energy)
    old_state, new_state = optimizer.state_dict()["state"], new_opt.state_dict()["state"]
    assert old_state.keys() == new_state.keys()
    for k in old_state:
        torch.testing.assert_close(old_state[k]["exp_avg_sq"], new_state[k]["exp_avg_sq"])


def test_loss_falls_in_the_conservative_phase_on_an_overfit_batch(samples, tmp_path):
    steps, finetune = 40, 30
    cfg = tiny_config(
        lr=1e-2,
        max_steps=steps,
        max_epochs=steps,
        conservative_finetune_steps=finetune,
        lr_decay="none",
        rotation_augment=False,
    )
    losses: dict[int, float] = {}
    fit_split(
        cfg,
        "forcenet",
        {**KWARGS, "basis_init_gain": 30.0},  # the recipe's gain: a shorter plateau at F = 0
        samples,
        tmp_path,
        graph=GRAPH,
        train=4,  # one batch: one step per epoch
        dev=samples[16:17],
        on_epoch_end=lambda step, m: losses.__setitem__(step, m["train_loss"]),
    )
    fine = [losses[s] for s in range(steps - finetune + 1, steps + 1)]  # conservative steps
    assert all(math.isfinite(x) for x in fine)
    assert sum(fine[-3:]) / 3 < 0.8 * fine[0]


@pytest.mark.parametrize("kill_at", [6, 8])  # 6: last direct checkpoint; 8: inside the fine-tune
def test_resume_across_the_switch_matches_uninterrupted(runs, samples, tmp_path, kill_at):
    cfg = tiny_config(**SETTINGS, conservative_finetune_steps=FINETUNE)

    def crash(step, metrics):
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        _fit(cfg, samples, tmp_path, on_epoch_end=crash)
    cut = C.load_checkpoint(tmp_path / "last.pt")
    assert cut["step"] == kill_at
    assert (cut["model_kwargs"]["forces"] == "gradient") == (kill_at > STEPS - FINETUNE)
    if kill_at > STEPS - FINETUNE:  # a fine-tune that would start later: refused
        later = tiny_config(**SETTINGS, conservative_finetune_steps=1)
        with pytest.raises(C.CheckpointError, match="train.conservative_finetune_steps 4 -> 1"):
            _fit(later, samples, tmp_path, resume=True)
        with pytest.raises(C.CheckpointError, match="conservative fine-tune at step 8"):
            _fit(later, samples, tmp_path, resume=True, allow_changed=True)  # even on purpose
    _fit(cfg, samples, tmp_path, resume=True)
    full = C.load_checkpoint(runs[0] / "last.pt")
    resumed = C.load_checkpoint(tmp_path / "last.pt")
    assert resumed["step"] == full["step"] == STEPS
    assert resumed["model_kwargs"] == full["model_kwargs"]
    for k, v in full["model_state"].items():
        assert torch.allclose(v, resumed["model_state"][k], atol=1e-6, rtol=0), k
    assert resumed["best_metric"] == pytest.approx(full["best_metric"], abs=1e-7)


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["train.max_steps=10", "train.conservative_finetune_steps=-1"], ">= 0"),
        (["train.max_steps=10", "train.conservative_finetune_steps=11"], "max_steps >= 11"),
        (["train.conservative_finetune_steps=5"], "max_steps >= 5"),
    ],
)
def test_bad_values_are_refused(sets, match):
    with pytest.raises(ValueError, match=match):
        load_run_config("forcenet", None, sets)


def test_the_set_path_and_bad_combinations(samples, tmp_path):
    kwargs, cfg = load_run_config(
        "forcenet", None, ["train.max_steps=10", "train.conservative_finetune_steps=4"]
    )
    assert cfg.conservative_finetune_steps == 4 and kwargs == {}
    assert phase_kwargs(cfg, "forcenet", {}, conservative=True) == {
        "energy_head": True,
        "forces": "gradient",
    }
    with pytest.raises(ValueError, match="only ForceNet"):
        phase_kwargs(cfg, "schnet", {}, conservative=False)
    with pytest.raises(ValueError, match="needs model.energy_head=true"):
        phase_kwargs(cfg, "forcenet", {"energy_head": False}, conservative=False)
    with pytest.raises(ValueError, match="energy_head=True"):
        C.build_model("forcenet", {**KWARGS, "forces": "gradient"})
    short = tiny_config(max_steps=10, max_epochs=1, conservative_finetune_steps=6)
    with pytest.raises(ValueError, match="max_epochs=1 binds before max_steps=10"):
        _fit(short, samples, tmp_path)
