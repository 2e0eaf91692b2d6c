"""Where a training run stands (:class:`Progress`) and how it starts: from scratch, or
resumed from its ``last.pt`` (weights, optimizer, progress and RNG states)."""

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
    checkpoint ``last`` when it exists (with its RNG states restored)."""
    ckpt = C.load_checkpoint(last) if resume and last.is_file() else None
    torch.manual_seed(cfg.seed)
    model = C.build_scaled_model(model_name, model_kwargs)
    progress = Progress()
    if ckpt is None:
        stats = label_stats(
            train_set, reference=cfg.energy_reference, element_energies=cfg.element_energies
        )
        set_scales(model, stats)
    else:
        check_same_model(last, ckpt, model_name, model_kwargs)
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
