"""Where a training run stands (:class:`Progress`) and how it starts: from scratch, or
resumed from its ``last.pt`` (weights, optimizer, progress and RNG states); and the switch
to the conservative fine-tune (:func:`start_conservative_phase`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from forcenet import checkpoint as C
from forcenet.train_config import TrainConfig
from forcenet.train_data import label_stats, set_scales


@dataclass
class Progress:
    """Where training stands; restored from ``last.pt`` on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # index of the current epoch (= completed epochs)
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    elapsed_s: float = 0.0  # wall-clock seconds trained so far, over all restarts
    graphs_seen: int = 0  # training structures consumed, over all ranks
    best_metric: float | None = None  # best dev forces_mae (eV/Å)


def start_training(
    cfg: TrainConfig,
    model_name: str,
    model_kwargs: dict[str, Any],
    train_set: Dataset,
    last: Path,
    *,
    resume: bool,
    device: torch.device,
) -> tuple[C.ScaledModel, torch.optim.Optimizer, Progress]:
    """The model (on ``device``), optimizer and progress to train from: new ones (seeded
    by ``cfg.seed``, label scales and energy references (``cfg.energy_reference``) from
    ``train_set``), or with ``resume`` those of the
    checkpoint ``last`` when it exists (with its RNG states restored).

    The model is built with :func:`phase_kwargs` (direct forces), or, resuming a
    checkpoint of the conservative fine-tune, with that phase's kwargs."""
    ckpt = C.load_checkpoint(last) if resume and last.is_file() else None
    kwargs = phase_kwargs(cfg, model_name, model_kwargs, conservative=False)
    if ckpt is not None and cfg.conservative_finetune_steps > 0:
        fine = phase_kwargs(cfg, model_name, model_kwargs, conservative=True)
        kwargs = fine if dict(ckpt["model_kwargs"]) == fine else kwargs
    torch.manual_seed(cfg.seed)
    model = C.build_scaled_model(model_name, kwargs)
    progress = Progress()
    if ckpt is None:
        stats = label_stats(
            train_set, reference=cfg.energy_reference, element_energies=cfg.element_energies
        )
        set_scales(model, stats)
    else:
        check_same_model(last, ckpt, model_name, kwargs)
        model.load_state_dict(ckpt["model_state"])
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer_state"])
        progress = Progress(**ckpt["train_info"]["progress"])
        C.restore_rng(ckpt["rng"])
    return model, optimizer, progress


def check_same_model(path: Path, ckpt: dict, name: str, kwargs: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint of another model or other constructor kwargs."""
    if ckpt["model_name"] != name or dict(ckpt["model_kwargs"]) != dict(kwargs):
        raise C.CheckpointError(
            f"{path}: cannot resume: it holds {ckpt['model_name']!r} {ckpt['model_kwargs']}, "
            f"asked for {name!r} {kwargs}"
        )


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
    """The same ForceNet with forces = -dE/dpos of its energy head, and its optimizer.

    Weights, buffers and the AdamW state carry over (the parameters are the same, in the
    same order). The force normalisation is kept; the energy scale becomes the force scale
    (a gradient-force model needs one scale, see :class:`forcenet.checkpoint.ScaledModel`
    and :func:`forcenet.train_data.set_scales`), and the energy head's weight and bias are
    multiplied by old energy scale / force scale, so the energy in eV is unchanged. The
    global RNG is not touched, so a resumed run switches the same way.
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
    new.to(next(model.parameters()).device)
    fresh = torch.optim.AdamW(new.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fresh.load_state_dict(optimizer.state_dict())
    return new, fresh
