"""The conservative fine-tune (``TrainConfig.conservative_finetune_steps`` N > 0, ForceNet):
the first budget - N steps train direct forces with the energy head on, the last N train
forces = -dE/dpos of that head. :func:`phase_kwargs` gives each phase's constructor kwargs,
:func:`start_step` where the switch falls and :func:`start_conservative_phase` makes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from forcenet import checkpoint as C
from forcenet.train.config import TrainConfig


def start_step(cfg: TrainConfig, model: C.ScaledModel, step: int, budget: int, last: Path) -> int:
    """The step where the conservative fine-tune starts (``budget`` without one); a
    ValueError when it does not fit the budget, a CheckpointError for a resumed
    ``last.pt`` (at ``step``) already in that phase before these settings start it."""
    n = cfg.conservative_finetune_steps
    if n > budget:
        raise ValueError(
            f"conservative_finetune_steps={n} > this run's {budget} steps "
            f"(max_epochs={cfg.max_epochs} binds before max_steps={cfg.max_steps})"
        )
    if n and model.energy_from_gradient and step < budget - n:
        raise C.CheckpointError(
            f"{last}: cannot resume: it is in the conservative fine-tune at step {step}, "
            f"which these settings start at step {budget - n}"
        )
    return budget - n


def phase_kwargs(
    cfg: TrainConfig, model_name: str, model_kwargs: dict[str, Any], *, conservative: bool
) -> dict[str, Any]:
    """The constructor kwargs a run trains with: ``model_kwargs`` as given, or with
    ``cfg.conservative_finetune_steps`` the ForceNet with its energy head and
    ``forces="direct"`` (``conservative`` False) or ``"gradient"``. A ValueError for a
    model without that option, or kwargs that contradict the fine-tune."""
    if cfg.conservative_finetune_steps == 0:
        return dict(model_kwargs)
    from forcenet.models import hyperparameters

    where = f"train {model_name}: conservative_finetune_steps={cfg.conservative_finetune_steps}"
    if "forces" not in hyperparameters(model_name):
        raise ValueError(f"{where}: only ForceNet has direct forces to fine-tune into -dE/dx")
    if not model_kwargs.get("energy_head", True):
        raise ValueError(f"{where} needs model.energy_head=true (its forces are -dE/dx of it)")
    if model_kwargs.get("forces", "direct") != "direct":
        raise ValueError(f"{where} trains direct forces first: leave model.forces at 'direct'")
    return {**model_kwargs, "energy_head": True, "forces": "gradient" if conservative else "direct"}


def start_conservative_phase(
    cfg: TrainConfig,
    model: C.ScaledModel,
    optimizer: torch.optim.Optimizer,
    model_name: str,
    model_kwargs: dict[str, Any],
) -> tuple[C.ScaledModel, torch.optim.Optimizer]:
    """The same ForceNet with forces = -dE/dpos of its energy head
    (:func:`conservative_model`), and its optimizer: the AdamW state carries over (the
    parameters are the same, in the same order)."""
    new = conservative_model(cfg, model, model_name, model_kwargs)
    fresh = torch.optim.AdamW(new.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fresh.load_state_dict(optimizer.state_dict())
    return new, fresh


def conservative_model(
    cfg: TrainConfig, model: C.ScaledModel, model_name: str, model_kwargs: dict[str, Any]
) -> C.ScaledModel:
    """``model`` (a ForceNet with its energy head) as forces = -dE/dpos of that head.

    Weights and buffers carry over. The force normalisation is kept; the energy scale
    becomes the force scale (a gradient-force model needs one scale, see
    :class:`forcenet.scaling.ScaledModel` and :func:`forcenet.scaling.set_scales`), and the
    energy head's weight and bias are multiplied by old energy scale / force scale, so the
    energy in eV is unchanged. The global RNG is not touched, so a resumed run switches
    the same way.
    """
    kwargs = phase_kwargs(cfg, model_name, model_kwargs, conservative=True)
    with torch.random.fork_rng(devices=[]):  # the fresh initialisation is overwritten
        new = C.build_scaled_model(model_name, kwargs)
    new.load_state_dict(model.state_dict())
    force_scale, energy_scale = new.get_buffer("force_scale"), new.get_buffer("energy_scale")
    head = new.model.get_submodule("energy_head")
    with torch.no_grad():
        ratio = energy_scale / force_scale
        for p in head.parameters():  # weight and bias
            p.mul_(ratio)
        energy_scale.copy_(force_scale)
    return new.to(next(model.parameters()).device)


def learning_rate(
    cfg: TrainConfig, step: int, progress: float, *, conservative: bool, switch_at: int, budget: int
) -> float:
    """The learning rate at ``step``: the run's schedule at ``progress`` of the budget, or
    in the conservative phase with ``cfg.conservative_lr`` > 0 the phase's own schedule,
    counted from its start ``switch_at`` to the end of the budget."""
    if conservative and cfg.conservative_lr > 0:
        into = step - switch_at
        return cfg.conservative_schedule.lr_at(into, into / max(budget - switch_at, 1))
    return cfg.schedule.lr_at(step, progress)
