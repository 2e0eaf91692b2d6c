"""The training loop: :func:`fit` (a frame store) and :func:`fit_datasets` (two datasets).

A run trains one model on the training split minus a *dev slice* that selects the
checkpoint (``best.pt``, lowest dev force MAE) and shows divergence; the validation splits
are never touched here. Its budget is a number of optimizer steps, so the same params,
seed and thread count give the same weights whatever else the machine is doing; an epoch
cap and an opt-in wall-clock cap end a run earlier if they bind first. The dev slice is
evaluated at every epoch end, every ``eval_every`` steps and at the end of the budget;
each evaluation writes ``last.pt``, from which a run resumes exactly (step, epoch,
position inside the epoch, RNG states). A NaN or infinite loss, gradient norm or dev MAE
stops the run with a :class:`~forcenet.train.step.NonFiniteError` naming the step; the
last good state stays on disk. Under torchrun every rank runs this (DDP).

Checkpoints hold results only: the wall-clock figures (``elapsed_s``, ``graphs_per_s``)
go to the ``on_epoch_end`` callback, so a rerun of the same run writes the same bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from forcenet import checkpoint as C
from forcenet import distributed as D
from forcenet.data import keys as K
from forcenet.data.graphs import GraphSettings
from forcenet.data.online import OnTheFlyGraphs
from forcenet.runtime import tune_malloc
from forcenet.schedule import budget_progress, total_steps
from forcenet.train import conservative
from forcenet.train.config import TrainConfig, make_loss
from forcenet.train.data import (
    MIN_DEV_SYSTEMS,
    DevSlice,
    TrainBatches,
    dev_split,
    dev_split_by_frame,
    fingerprint,
    read_sids,
)
from forcenet.train.ema import WeightAverage
from forcenet.train.log import StepLog, end_warnings, fine_tune_line, progress_line, start_line
from forcenet.train.state import TRAINED_STATE, Progress, run_record, start_training
from forcenet.train.step import NonFiniteError, train_step

EpochCallback = Callable[[int, dict[str, float]], None]

#: Wall-clock figures of an evaluation's metrics: given to the callback, never saved.
TIMINGS = ("elapsed_s", "graphs_per_s")

_now = time.monotonic  # the clock of the wall-clock cap and the throughput (tests replace it)


def fit_datasets(
    cfg: TrainConfig,
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    train_set: Dataset,
    dev_set: Dataset,
    out_dir: Path,
    graph: GraphSettings,
    on_the_fly: bool = False,
    resume: bool = False,
    allow_changed: bool = False,
    params_snapshot: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train on ``train_set``, select on ``dev_set``; checkpoints in ``out_dir``.

    ``graph``: the settings the samples' graphs were built with (kept in the checkpoint).
    ``on_the_fly``: the samples are frames without graphs; each batch gets its graph built
    with ``graph`` on the training device (the same edges as a graph store). ``resume``:
    continue from ``out_dir/last.pt`` if it exists (same model and kwargs required),
    reaching the same weights as an uninterrupted run; refused when the settings or the
    training data differ from the checkpoint's, naming the keys
    (:func:`forcenet.train.state.check_same_run`), unless ``allow_changed``.
    ``on_epoch_end`` (rank 0) gets (step, metrics) after each evaluation, once its
    checkpoint is written.

    ``cfg.conservative_finetune_steps`` N > 0 (ForceNet): the last N steps train forces =
    -dE/dpos (:mod:`forcenet.train.conservative`); from the switch on only conservative
    checkpoints can become ``best.pt``. Returns ``best.pt`` (``last.pt`` without a dev
    slice).
    """
    info = D.init_distributed()
    if info.device.type == "cpu":
        tune_malloc()  # keep large activations mapped across steps (forcenet.runtime)
    run = run_record(cfg, model_kwargs, graph, fingerprint(train_set))
    ckpts = Checkpoints(Path(out_dir), cfg, model_name, model_kwargs, params_snapshot, graph, run)
    model, averaged, optimizer, progress = start_training(
        cfg, model_name, model_kwargs, train_set, ckpts.last,
        resume=resume, device=info.device, run=run, allow_changed=allow_changed,
    )  # fmt: skip
    builder = OnTheFlyGraphs(graph) if on_the_fly else None
    batches, dev = (
        TrainBatches(train_set, cfg, info, builder),
        DevSlice(dev_set, cfg, info, builder),
    )
    per_epoch = batches.steps_per_epoch
    budget = total_steps(per_epoch, cfg.max_epochs, cfg.max_steps)
    switch_at = conservative.start_step(cfg, model, progress.step, budget, ckpts.last)
    log = StepLog(model_name, budget, progress.step, enabled=info.is_main)
    log.write(start_line(model_name, cfg, model, batches.size, dev.size, resumed=progress.step > 0))
    clock, window = Clock(cfg.time_budget_s, progress.elapsed_s), Window()
    loss_fn, net = make_loss(cfg, model), _wrap(model, info)
    while progress.step < budget and not clock.out_of_time():
        if progress.step >= switch_at and not model.energy_from_gradient:
            model, optimizer = conservative.start_conservative_phase(
                cfg, model, optimizer, model_name, model_kwargs
            )
            if averaged is not None:
                averaged = averaged.converted(
                    lambda m: conservative.conservative_model(cfg, m, model_name, model_kwargs)
                )
            loss_fn, net = make_loss(cfg, model), _wrap(model, info)
            progress.best_metric = None  # from here only conservative checkpoints are best.pt
            log.write(fine_tune_line(model_name, progress.step, budget, model))
        progress.elapsed_s = clock.elapsed()
        if not clock.over(progress.elapsed_s):
            batch = batches.next(progress.epoch, progress.batches_in_epoch, progress.step)
            frac = budget_progress(
                progress.step, per_epoch, cfg.max_epochs, progress.elapsed_s,
                cfg.time_budget_s, cfg.max_steps,
            )  # fmt: skip
            lr = set_lr(optimizer, conservative.learning_rate(
                cfg, progress.step, frac, conservative=model.energy_from_gradient,
                switch_at=switch_at, budget=budget,
            ))  # fmt: skip
            amp = cfg.amp and not model.energy_from_gradient  # no double backward in bf16
            try:
                diag = train_step(
                    net, batch, optimizer, loss_fn=loss_fn, amp=amp, clip_grad=cfg.clip_grad
                )
            except NonFiniteError as exc:
                raise NonFiniteError(
                    f"train {model_name}: {exc} at step {progress.step + 1}; {ckpts.kept()}"
                ) from exc
            if averaged is not None:
                averaged.update(model)
            progress.advance(graphs=len(batch[K.NATOMS]) * info.world_size)
            window.add(diag["loss"], len(batch[K.NATOMS]) * info.world_size, lr)
            log.step(progress.step, loss=diag["loss"], graphs_per_s=window.rate(), lr=lr)
            if not evaluation_due(progress, cfg.eval_every, per_epoch, (switch_at, budget)):
                continue
        progress.elapsed_s = clock.elapsed()
        evaluated = model if averaged is None else averaged.model
        metrics = {**dev.evaluate(evaluated), **window.close(progress)}
        try:
            progress.record_eval(metrics, per_epoch)
        except NonFiniteError as exc:
            raise NonFiniteError(f"train {model_name}: {exc}; {ckpts.kept()}") from exc
        if info.is_main:
            ckpts.save(model, optimizer, progress, metrics, averaged)
        D.barrier()
        if info.is_main and on_epoch_end is not None:
            on_epoch_end(progress.step, metrics)
        log.write(progress_line(model_name, progress, budget, metrics))
        window = Window()
    log.close()
    for line in end_warnings(model_name, cfg, model, progress, switch_at, batches.size):
        log.write(line)
    return ckpts.result(dev.size, model_name, is_main=info.is_main)


def evaluation_due(progress: Progress, eval_every: int, per_epoch: int, ends: tuple) -> bool:
    """Whether the dev slice is evaluated after this step: at an epoch end, every
    ``eval_every`` steps, and at each of ``ends`` (the fine-tune's start, the budget)."""
    every = eval_every > 0 and progress.step % eval_every == 0
    return progress.batches_in_epoch == per_epoch or every or progress.step in ends


def set_lr(optimizer: Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class Clock:
    """Wall-clock seconds trained over all restarts, the same on every rank (the largest),
    against the opt-in cap ``budget_s`` (0 = none)."""

    def __init__(self, budget_s: float, elapsed_s: float) -> None:
        self.budget_s, self.start = budget_s, _now() - elapsed_s

    def elapsed(self) -> float:
        return D.sync_max(_now() - self.start)

    def over(self, elapsed_s: float) -> bool:
        return self.budget_s > 0 and elapsed_s >= self.budget_s

    def out_of_time(self) -> bool:
        return self.budget_s > 0 and self.over(self.elapsed())


class Window:
    """The steps since the last evaluation: mean training loss, throughput, last lr."""

    def __init__(self) -> None:
        self.start, self.loss, self.steps, self.graphs, self.lr = _now(), 0.0, 0, 0, 0.0

    def add(self, loss: float, graphs: int, lr: float) -> None:
        self.loss, self.steps, self.graphs, self.lr = (
            self.loss + loss, self.steps + 1, self.graphs + graphs, lr
        )  # fmt: skip

    def rate(self) -> float:
        """Training structures per wall-clock second (all ranks)."""
        return self.graphs / max(_now() - self.start, 1e-9)

    def close(self, progress: Progress) -> dict[str, float]:
        return {
            "train_loss": self.loss / max(self.steps, 1),
            "step": float(progress.step),
            "elapsed_s": progress.elapsed_s,
            "graphs_seen": float(progress.graphs_seen),
            "graphs_per_s": self.rate(),
            "lr": self.lr,
        }


class Checkpoints:
    """``last.pt`` (every evaluation: the last good state) and ``best.pt`` (the lowest dev
    force MAE so far) in ``out_dir``; each holds results only (no :data:`TIMINGS`; the
    wall clock only under a wall-clock cap, which needs it to resume)."""

    def __init__(
        self,
        out_dir: Path,
        cfg: TrainConfig,
        model_name: str,
        model_kwargs: dict[str, Any],
        params: dict[str, Any] | None,
        graph: GraphSettings,
        run: dict[str, Any],
    ) -> None:
        self.out_dir, self.last, self.cfg = out_dir, out_dir / "last.pt", cfg
        self.model_name, self.model_kwargs = model_name, model_kwargs
        self.params, self.graph, self.run = params or {}, graph, run
        self.saved_step: int | None = None  # the step of the last.pt this run wrote

    def save(
        self,
        model: C.ScaledModel,
        optimizer: Optimizer,
        progress: Progress,
        metrics: dict,
        averaged: WeightAverage | None = None,
    ) -> None:
        """Write ``last.pt`` (and ``best.pt`` at a new best); with a weight average, its
        model is the average and the trained weights are kept as ``trained_state``."""
        kwargs = conservative.phase_kwargs(
            self.cfg, self.model_name, self.model_kwargs, conservative=model.energy_from_gradient
        )
        state = C.training_state(
            model if averaged is None else averaged.model,
            optimizer,
            model_name=self.model_name,
            model_kwargs=kwargs,
            progress=progress.saved(with_clock=self.cfg.time_budget_s > 0),
            params=self.params,
            graph=self.graph.as_dict(),
            metrics={k: v for k, v in metrics.items() if k not in TIMINGS},
            base_lr=self.cfg.lr,
            run=self.run,
        )
        if averaged is not None:
            state[TRAINED_STATE] = model.state_dict()
        C.save_checkpoint(self.last, state)
        self.saved_step = progress.step
        if progress.best_metric is not None and metrics.get("forces_mae") == progress.best_metric:
            C.save_checkpoint(self.out_dir / "best.pt", state)

    def kept(self) -> str:
        """What a stop leaves on disk: last.pt is written only at good evaluations."""
        if self.saved_step is not None:
            return f"{self.last} keeps the last good state (step {self.saved_step})"
        if self.last.is_file():
            return f"{self.last} is unchanged (written before this run's first evaluation)"
        return "no last.pt was written"

    def result(self, n_dev: int, model_name: str, *, is_main: bool) -> Path:
        """The checkpoint to evaluate: ``best.pt``, or ``last.pt`` without a dev slice."""
        best = self.out_dir / "best.pt"
        if best.is_file():
            return best
        if n_dev:  # not reached: every finite dev force MAE is tracked and saved
            raise RuntimeError(f"train {model_name}: a dev slice but no {best} was written")
        if is_main:
            tqdm.write(f"train {model_name}: no dev slice, so no best.pt: {self.last} is it")
        return self.last


def _wrap(model: C.ScaledModel, info: D.DistInfo) -> nn.Module:
    """``model`` as trained: itself, or under DDP wrapped in DistributedDataParallel."""
    if not info.distributed:
        return model
    ids = [info.device] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def fit(
    cfg: TrainConfig,
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    train_dir: Path,
    graphs_dir: Path | None,
    out_dir: Path,
    graph: GraphSettings | None = None,
    resume: bool = False,
    allow_changed: bool = False,
    params_snapshot: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """:func:`fit_datasets` on the frame store ``train_dir`` (+ graphs ``graphs_dir``),
    its dev slice carved out here (:func:`forcenet.train.data.dev_split`).

    ``graphs_dir`` None: on-the-fly graphs with ``graph`` (cutoff, max_neighbors; required
    then, and refused with a graph store, whose own settings are used and recorded).
    """
    from forcenet.data.dataset import FrameDataset

    sids = read_sids(Path(train_dir))
    train_idx, dev_idx = dev_split(sids, cfg.dev_fraction, cfg.seed)
    if cfg.dev_fraction > 0 and dev_split_by_frame(sids) and os.environ.get("RANK", "0") == "0":
        tqdm.write(
            f"train {model_name}: {len(set(sids))} system(s) < {MIN_DEV_SYSTEMS}: the dev "
            f"slice holds out {len(dev_idx)} of {len(sids)} frames, drawn by frame (seed {cfg.seed})"
        )
    if graphs_dir is None:
        if graph is None:
            raise ValueError("on-the-fly graphs need the graph settings (cutoff, max_neighbors)")
        full, settings = FrameDataset(Path(train_dir)), graph
    else:
        if graph is not None:
            raise ValueError(f"{graphs_dir}: a graph store brings its own settings; pass no graph")
        full = FrameDataset(Path(train_dir), Path(graphs_dir))
        if full.graph_settings is None:  # not reached: a dataset with graphs has settings
            raise ValueError(f"{graphs_dir}: no graph settings")
        settings = full.graph_settings
    return fit_datasets(
        cfg,
        model_name,
        model_kwargs,
        train_set=Subset(full, train_idx),
        dev_set=Subset(full, dev_idx),
        out_dir=out_dir,
        graph=settings,
        on_the_fly=graphs_dir is None,
        resume=resume,
        allow_changed=allow_changed,
        params_snapshot=params_snapshot,
        on_epoch_end=on_epoch_end,
    )
