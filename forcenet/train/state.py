"""Where a training run stands (:class:`Progress`) and what it starts from: a new model
with the training set's label scales, or everything its ``last.pt`` saved (weights,
optimizer, progress and RNG states).

A checkpoint also keeps the run's settings (:func:`run_record`: the
:class:`~forcenet.train.config.TrainConfig`, the model kwargs, the graph settings and a
fingerprint of the training frames); a resume with other ones is refused, naming the
keys that differ (:func:`check_same_run`), unless it is allowed on purpose. The
settings of :data:`RESUMABLE_CHANGES` may change freely.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from forcenet import checkpoint as C
from forcenet.data.graphs import GraphSettings
from forcenet.distributed import is_rank_zero
from forcenet.scaling import element_fit_warning, label_stats, read_isolated_energies, set_scales
from forcenet.train.config import TrainConfig
from forcenet.train.conservative import phase_kwargs
from forcenet.train.ema import WeightAverage
from forcenet.train.step import NonFiniteError

#: The checkpoint key of the trained weights when the model it holds is their average.
TRAINED_STATE = "trained_state"

#: Dev metrics that must stay finite (a NaN here means the model or the data diverged).
CHECKED_METRICS = ("forces_mae", "energy_mae", "train_loss")

#: Settings a resumed run may change: they leave the weights and the batches alone
#: (DataLoader workers; the dev evaluation's batch size, whose metrics are exact sums),
#: or stop a run (the wall-clock cap: a run it stopped resumes under a larger one).
RESUMABLE_CHANGES = ("train.num_workers", "train.eval_batch_size", "train.time_budget_s")


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
    run: dict[str, Any] | None = None,
    allow_changed: bool = False,
) -> tuple[C.ScaledModel, WeightAverage | None, torch.optim.Optimizer, Progress]:
    """The model (on ``device``), optimizer and progress to train from: new ones (seeded
    by ``cfg.seed``, label scales and energy references (``cfg.energy_reference``) from
    ``train_set``), or with ``resume`` those of the checkpoint ``last`` when it exists
    (with its RNG states restored), refused when its run settings differ from ``run``
    (:func:`run_record`) unless ``allow_changed``. With ``cfg.ema_decay`` > 0 also the
    average of the weights (:class:`forcenet.train.ema.WeightAverage`): a copy of the new
    model, or the checkpoint's model, whose trained weights are then its ``trained_state``.

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
            train_set, reference=cfg.energy_reference, element_energies=reference_energies(cfg)
        )
        say(element_fit_warning(model_name, stats))
        set_scales(model, stats)
    else:
        if run is not None:
            say(check_same_run(last, ckpt, run, model_name, allow_changed=allow_changed))
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
        for group in optimizer.param_groups:  # a changed weight decay (allowed) applies
            group["weight_decay"] = cfg.weight_decay
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


def reference_energies(cfg: TrainConfig) -> dict[str, float]:
    """The given per-element energies: ``cfg.element_energies``, or for ``isolated`` those
    of the single-atom frames of ``cfg.isolated_atoms``."""
    if cfg.energy_reference == "isolated" and cfg.isolated_atoms is not None:
        return read_isolated_energies(Path(cfg.isolated_atoms))
    return dict(cfg.element_energies)


def say(line: str | None) -> None:
    """Print a line of the run's start (rank 0 only)."""
    if line and is_rank_zero():
        tqdm.write(line)


def run_record(
    cfg: TrainConfig, model_kwargs: dict[str, Any], graph: GraphSettings, data: dict[str, Any]
) -> dict[str, Any]:
    """The settings of a run, kept in its checkpoints: ``{"train": the TrainConfig,
    "model": the model kwargs, "graph": cutoff and max_neighbors, "data": the training
    frames' fingerprint (:func:`forcenet.train.data.fingerprint`)}``, as plain values."""
    return {
        "train": _plain(asdict(cfg)),
        "model": _plain(dict(model_kwargs)),
        "graph": _plain(graph.as_dict()),
        "data": _plain(dict(data)),
    }


def check_same_run(
    path: Path, ckpt: dict, run: dict[str, Any], name: str, *, allow_changed: bool
) -> str | None:
    """Refuse to resume checkpoint ``path`` with settings other than those it was trained
    with (``ckpt["run"]``), naming every key that differs, except
    :data:`RESUMABLE_CHANGES` and a training setting the checkpoint predates that keeps
    its default; ``allow_changed``: continue, and say what changed. A checkpoint without
    stored settings (written before they were kept) resumes with a warning. Returns the
    line to print, if any."""
    stored = ckpt.get("run")
    if not isinstance(stored, dict):
        return (
            f"WARNING: train {name}: {path} predates the stored run settings: resuming "
            "without checking that the settings and the training data are the run's"
        )
    defaults = {f"train.{k}": v for k, v in _plain(asdict(TrainConfig())).items()}
    changed = [
        f"{key} {_show(old)} -> {_show(new)}"
        for key, (old, new) in _differences(stored, run).items()
        if key not in RESUMABLE_CHANGES and not (old is _MISSING and new == defaults.get(key))
    ]
    if not changed:
        return None
    if allow_changed:
        return f"WARNING: train {name}: resuming {path} with changed settings: {', '.join(changed)}"
    raise C.CheckpointError(
        f"{path}: cannot resume: the run was trained with other settings ({', '.join(changed)}); "
        "resume with --allow-changed (allow_changed=True) to continue with the new ones on "
        "purpose, or start afresh (--overwrite)"
    )


def _differences(stored: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{"train.lr": (old, new), ...}`` over the sections of two :func:`run_record`."""
    out = {}
    for section in sorted(set(stored) | set(current)):
        old, new = dict(stored.get(section) or {}), dict(current.get(section) or {})
        for key in [*old, *(k for k in new if k not in old)]:
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            if _plain(a) != _plain(b):
                out[f"{section}.{key}"] = (a, b)
    return out


_MISSING = object()  # a key one of the two records lacks


def _show(value: Any) -> str:
    return "(not set)" if value is _MISSING else repr(value)


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (as compared and saved; plain types only)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
