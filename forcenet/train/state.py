"""Where a training run stands (:class:`Progress`) and what it starts from: a new model
with the training set's label scales, or everything its ``last.pt`` saved (weights,
optimizer, progress and RNG states)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from forcenet import checkpoint as C
from forcenet.scaling import label_stats, set_scales
from forcenet.train.config import TrainConfig
from forcenet.train.conservative import phase_kwargs
from forcenet.train.ema import WeightAverage
from forcenet.train.step import NonFiniteError

#: The checkpoint key of the trained weights when the model it holds is their average.
TRAINED_STATE = "trained_state"

#: Dev metrics that must stay finite (a NaN here means the model or the data diverged).
CHECKED_METRICS = ("forces_mae", "energy_mae", "train_loss")


@dataclass
class Progress:
    """Where training stands; restored from ``last.pt`` on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # index of the current epoch (= completed epochs)
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    elapsed_s: float = 0.0  # wall-clock seconds trained so far, over all restarts
    graphs_seen: int = 0  # training structures consumed, over all ranks
    best_metric: float | None = None  # best dev forces_mae (eV/Å)

    def advance(self, graphs: int) -> None:
        """One optimizer step on ``graphs`` structures (over all ranks) done."""
        self.step += 1
        self.batches_in_epoch += 1
        self.graphs_seen += graphs

    def record_eval(self, metrics: dict[str, float], steps_per_epoch: int) -> None:
        """Close the epoch if it is complete, add ``epoch`` (fractional) to ``metrics`` and
        track the best dev force MAE; a non-finite :data:`CHECKED_METRICS` one raises
        :class:`NonFiniteError` naming it and the step, before anything is saved."""
        bad = [k for k in CHECKED_METRICS if k in metrics and not math.isfinite(metrics[k])]
        if bad:
            what = ", ".join(
                f"{'' if k == 'train_loss' else 'dev '}{k} is {metrics[k]}" for k in bad
            )
            raise NonFiniteError(f"{what} at step {self.step}")
        if self.batches_in_epoch == steps_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        metrics["epoch"] = self.epoch + self.batches_in_epoch / steps_per_epoch
        mae = metrics.get("forces_mae")
        if mae is not None and (self.best_metric is None or mae < self.best_metric):
            self.best_metric = mae

    def saved(self, *, with_clock: bool) -> dict[str, Any]:
        """What a checkpoint keeps: the counters, and the wall clock only ``with_clock``
        (runs with a wall-clock cap need it to resume; a step budget's checkpoint holds
        results only, so a rerun writes the same bytes)."""
        state = asdict(self)
        if not with_clock:
            del state["elapsed_s"]
        return state


def start_training(
    cfg: TrainConfig,
    model_name: str,
    model_kwargs: dict[str, Any],
    train_set: Dataset,
    last: Path,
    *,
    resume: bool,
    device: torch.device,
) -> tuple[C.ScaledModel, WeightAverage | None, torch.optim.Optimizer, Progress]:
    """The model (on ``device``), optimizer and progress to train from: new ones (seeded
    by ``cfg.seed``, label scales and energy references (``cfg.energy_reference``) from
    ``train_set``), or with ``resume`` those of the checkpoint ``last`` when it exists
    (with its RNG states restored). With ``cfg.ema_decay`` > 0 also the average of the
    weights (:class:`forcenet.train.ema.WeightAverage`): a copy of the new model, or the
    checkpoint's model, whose trained weights are then its ``trained_state``.

    The model is built with :func:`forcenet.train.conservative.phase_kwargs` (direct
    forces), or, resuming a checkpoint of the conservative fine-tune, with that phase's."""
    ckpt = C.load_checkpoint(last) if resume and last.is_file() else None
    kwargs = phase_kwargs(cfg, model_name, model_kwargs, conservative=False)
    if ckpt is not None and cfg.conservative_finetune_steps > 0:
        fine = phase_kwargs(cfg, model_name, model_kwargs, conservative=True)
        kwargs = fine if dict(ckpt["model_kwargs"]) == fine else kwargs
    torch.manual_seed(cfg.seed)
    model = C.build_scaled_model(model_name, kwargs, cfg.frame_averaging)
    progress = Progress()
    if ckpt is None:
        stats = label_stats(
            train_set, reference=cfg.energy_reference, element_energies=cfg.element_energies
        )
        set_scales(model, stats)
    else:
        check_same_model(last, ckpt, model_name, kwargs)
        model.load_state_dict(ckpt.get(TRAINED_STATE, ckpt["model_state"]))
    model.to(device)
    averaged = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        if averaged is not None:
            if TRAINED_STATE not in ckpt:
                raise C.CheckpointError(
                    f"{last}: cannot resume with ema_decay={cfg.ema_decay}: it was written "
                    "without a weight average (ema_decay 0)"
                )
            averaged.model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        progress = Progress(**ckpt["train_info"]["progress"])
        C.restore_rng(ckpt["rng"])
    return model, averaged, optimizer, progress


def check_same_model(path: Path, ckpt: dict, name: str, kwargs: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint of another model or other constructor kwargs."""
    if ckpt["model_name"] != name or dict(ckpt["model_kwargs"]) != dict(kwargs):
        raise C.CheckpointError(
            f"{path}: cannot resume: it holds {ckpt['model_name']!r} {ckpt['model_kwargs']}, "
            f"asked for {name!r} {kwargs}"
        )
