"""Training as plain functions: ``train_step``, ``evaluate``, ``fit``.

``fit`` trains one model on the training split minus a *dev slice* (a deterministic
fraction of the training systems, by ``sid``, or of the frames when there are fewer than
``MIN_DEV_SYSTEMS`` systems) that drives model selection (``best.pt``) and diagnostics; the validation splits are never touched here. It checkpoints every epoch
and at the end of the budget (``out_dir/last.pt``; ``best.pt`` by dev force MAE,
``forces_mae``), resumes exactly (step counter, epoch, position inside the epoch, RNG
states) and runs under torchrun (DDP). The budget is a number of optimizer steps
(``max_steps``), so that the same params, seed and thread count give the same weights
whatever else the machine is doing; an epoch cap and an opt-in wall-clock cap end a run
earlier if they bind first. A NaN or infinite training loss, gradient norm or dev MAE
stops the run with a :class:`NonFiniteError` naming the step and the metric; ``last.pt``
then still holds the last good evaluation's state.

The hyperparameters are a :class:`forcenet.train_config.TrainConfig`; the dev slice and
the label normalisation (buffers of the :class:`forcenet.checkpoint.ScaledModel` wrapper,
so the saved model predicts physical units) are in :mod:`forcenet.train_data`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset
from tqdm import tqdm

from forcenet import checkpoint as C
from forcenet import distributed as D
from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate
from forcenet.data.dataset import batch_loader
from forcenet.data.graphs import GraphSettings
from forcenet.data.online import OnTheFlyGraphs
from forcenet.geometry import random_rotations, rotate_batch
from forcenet.losses import TrainLoss
from forcenet.metrics import OC20Metrics
from forcenet.runtime import tune_malloc
from forcenet.schedule import budget_progress, lr_factor, total_steps
from forcenet.train_config import TrainConfig, make_loss
from forcenet.train_data import (
    MIN_DEV_SYSTEMS,
    dataset_size,
    dev_split,
    dev_split_by_frame,
    read_sids,
)
from forcenet.train_log import StepLog, progress_line, start_line
from forcenet.train_state import (
    Progress,
    phase_kwargs,
    start_conservative_phase,
    start_training,
)

__all__ = [
    "EpochCallback",
    "NonFiniteError",
    "TrainConfig",
    "evaluate",
    "fit",
    "fit_datasets",
    "train_step",
]

EpochCallback = Callable[[int, dict[str, float]], None]

#: Dev metrics that must stay finite (a NaN here means the model or the data diverged).
CHECKED_METRICS = ("forces_mae", "energy_mae", "train_loss")


class NonFiniteError(FloatingPointError, RuntimeError):
    """A NaN or infinite training loss or dev metric; the message names the step (and the
    metric). A RuntimeError too, so the CLI and the pipeline stages print it as one line."""


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: TrainLoss,
    amp: bool = False,
    clip_grad: float = 0.0,
) -> dict[str, float]:
    """One optimizer step on ``batch`` (already on the model's device); returns diagnostics.

    Under DDP the loss denominators (total atom weight, number of structures) are summed
    over ranks, so the averaged gradient equals that of one global weighted mean.
    ``amp``: bf16 autocast (CUDA only). ``clip_grad`` > 0 clips the global gradient norm.
    A non-finite loss or gradient norm raises :class:`NonFiniteError` before the optimizer
    step, so the weights stay those of the last good step.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = batch[K.POS].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp and device_type == "cuda"):
        out = model(batch)
    terms = loss_fn.terms(out, batch)
    names = sorted(terms)
    local = torch.stack([terms[n].weight.to(torch.float64) for n in names]).to(batch[K.POS].device)
    world = D.dist_info().world_size
    weights = D.all_reduce_sum(local) / world  # DDP averages gradients over ranks
    loss = loss_fn.combine(terms, {n: weights[k].float() for k, n in enumerate(names)})
    if not torch.isfinite(loss):
        raise NonFiniteError(f"non-finite training loss {loss.item()}")
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(grad_norm):  # a finite loss can still have a NaN gradient
        raise NonFiniteError(f"non-finite gradient norm {float(grad_norm)}")
    optimizer.step()
    diag = {"loss": float(loss.detach())}
    for k, n in enumerate(names):
        diag[f"loss_{n}"] = float(terms[n].total.detach()) / max(float(weights[k]) * world, 1e-12)
    diag["grad_norm"] = float(grad_norm)
    return diag


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str,
    graphs: OnTheFlyGraphs | None = None,
) -> dict[str, float]:
    """The OC20 metrics of :class:`forcenet.metrics.OC20Metrics` over ``loader``, exact
    float64 sums over free atoms, summed over ranks (each rank a non-padded shard).

    The dev metrics are thus named as in the evaluation: ``forces_mae`` (eV/Å, the
    selection metric), ``zero_forces_mae``, ``forces_mae_surface``, ``forces_mae_adsorbate``,
    ``zero_forces_mae_surface``, ... (when the data have both tags), ``energy_mae`` (eV)
    when the model has an energy, ``num_free_atoms``, ``num_structures``. ``graphs``:
    builds the batches' edges on ``device`` (on-the-fly graphs; the loader gives frames).
    """
    model.eval()
    needs_grad = bool(getattr(model, "energy_from_gradient", False))
    acc = OC20Metrics()
    for batch in loader:
        batch = batch_to(batch, device)
        if graphs is not None:
            batch = graphs(batch)
        with torch.set_grad_enabled(needs_grad):
            out = model(batch)
        acc.update(out, batch)
    acc.load_state(D.all_reduce_sum(acc.state().to(device)))
    return acc.compute()


# --------------------------------------------------------------------------- fit

_now = time.monotonic  # the clock of the wall-clock budget (tests replace it)


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
    params_snapshot: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train ``model_name`` on the frame store ``train_dir`` (+ graphs ``graphs_dir``).

    ``graphs_dir`` None: on-the-fly graphs, built per batch on the training device with
    ``graph`` (cutoff, max_neighbors; required then, and refused with a graph store,
    whose own settings are used).

    The dev slice (``cfg.dev_fraction`` of the training systems, or of the frames when
    there are fewer than ``MIN_DEV_SYSTEMS`` systems, said in one log line) is carved out
    here. The
    settings the graphs were built with (read from the graph store) are recorded in the
    checkpoint. Returns the path of ``best.pt`` (lowest dev force MAE; ``last.pt`` when
    there is no dev slice). See :func:`fit_datasets` for the rest.
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
        full = FrameDataset(Path(train_dir))
        settings = graph
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
        params_snapshot=params_snapshot,
        on_epoch_end=on_epoch_end,
    )


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
    params_snapshot: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train on ``train_set``, select on ``dev_set``; checkpoints in ``out_dir``.

    ``graph``: the settings the samples' graphs were built with (recorded in the
    checkpoint). ``on_the_fly``: the samples are frames without graphs, and every batch
    gets its graph built with ``graph`` on the training device
    (:class:`forcenet.data.online.OnTheFlyGraphs`), the same edges as a graph store.

    ``resume``: continue from ``out_dir/last.pt`` if it exists (same model name and
    kwargs required), reaching the same weights as an uninterrupted run. ``on_epoch_end``
    (rank 0 only) gets (epoch number, metrics) after each epoch and at the budget end,
    after the checkpoint is written. Under DDP every rank calls this with the same data.

    ``cfg.conservative_finetune_steps`` N > 0 (ForceNet): the first budget - N steps train
    direct forces (with the energy head on), then an evaluation and ``last.pt`` close that
    phase and the model switches to forces = -dE/dpos
    (:func:`forcenet.train_state.start_conservative_phase`) for the last N steps. The best
    dev force MAE restarts there: only conservative checkpoints can become ``best.pt``
    from then on, so the checkpoint returned predicts conservative forces (unless the
    wall-clock cap ends the run before that phase). Resuming works on either side.
    """
    info = D.init_distributed()
    if info.device.type == "cpu":
        tune_malloc()  # keep large activations mapped across steps (forcenet.runtime)
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    model, optimizer, progress = start_training(
        cfg, model_name, model_kwargs, train_set, last, resume=resume, device=info.device
    )
    loss_fn = make_loss(cfg, model)
    net = _wrap(model, info)
    n_train, n_dev = dataset_size(train_set), dataset_size(dev_set)
    shard = D.shard_indices(n_dev, info.rank, info.world_size)
    pin = info.device.type == "cuda"  # page-locked batches: faster, asynchronous copies
    dev_loader = DataLoader(
        Subset(dev_set, shard), batch_size=cfg.eval_batch_size, collate_fn=collate, pin_memory=pin
    )
    builder = OnTheFlyGraphs(graph) if on_the_fly else None
    steps_per_epoch = math.ceil(n_train / info.world_size) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"training set of {n_train} frames < batch_size {cfg.batch_size}")
    if info.is_main:
        tqdm.write(start_line(model_name, cfg, model, n_train, n_dev, resumed=progress.step > 0))
    saved_step: list[int] = []  # the step of the last.pt on disk (the last good state)

    def save(metrics: dict[str, float]) -> None:
        state = C.training_state(
            model,
            optimizer,
            model_name=model_name,
            model_kwargs=phase_kwargs(
                cfg, model_name, model_kwargs, conservative=model.energy_from_gradient
            ),
            progress=vars(progress),
            params=params_snapshot or {},
            graph=graph.as_dict(),
            metrics=metrics,
            base_lr=cfg.lr,
        )
        C.save_checkpoint(last, state)
        saved_step[:] = [progress.step]
        if progress.best_metric is not None and metrics.get("forces_mae") == progress.best_metric:
            C.save_checkpoint(out_dir / "best.pt", state)

    budget = total_steps(steps_per_epoch, cfg.max_epochs, cfg.max_steps)
    conservative_from = _conservative_start(cfg, model, progress.step, budget, last)
    bar = StepLog(model_name, budget, progress.step, enabled=info.is_main)
    clock0 = _now() - progress.elapsed_s

    def out_of_time() -> bool:
        return cfg.time_budget_s > 0 and D.sync_max(_now() - clock0) >= cfg.time_budget_s

    def kept() -> str:
        """What a stop leaves on disk: last.pt is written only at good evaluations."""
        if saved_step:
            return f"{last} keeps the last good state (step {saved_step[0]})"
        if last.is_file():
            return f"{last} is unchanged (written before this run's first evaluation)"
        return "no last.pt was written"

    while progress.step < budget and not out_of_time():
        if progress.step >= conservative_from and not model.energy_from_gradient:
            model, optimizer = start_conservative_phase(
                cfg, model, optimizer, model_name, model_kwargs
            )
            loss_fn, net = make_loss(cfg, model), _wrap(model, info)
            progress.best_metric = None  # from here only conservative checkpoints are best.pt
            if info.is_main:
                tqdm.write(
                    f"train {model_name}: step {progress.step}: conservative fine-tune, "
                    f"forces = -dE/dx for the last {budget - progress.step} steps, energy "
                    f"scale {float(model.energy_scale):.4g} eV (= the force scale); best.pt "
                    "from this phase only"
                )
        phase_end = conservative_from if progress.step < conservative_from else budget
        try:
            done = _train_epoch(
                cfg,
                net,
                optimizer,
                loss_fn,
                train_set,
                progress,
                info,
                steps_per_epoch,
                phase_end,
                clock0,
                bar,
                builder,
            )
        except NonFiniteError as exc:
            raise NonFiniteError(
                f"train {model_name}: {exc} at step {progress.step + 1}; {kept()}"
            ) from exc
        metrics = evaluate(model, dev_loader, device=info.device, graphs=builder) if n_dev else {}
        metrics.update(done)
        try:
            _record_eval(progress, metrics, steps_per_epoch)
        except NonFiniteError as exc:
            raise NonFiniteError(f"train {model_name}: {exc}; {kept()}") from exc
        if info.is_main:
            save(metrics)
        D.barrier()
        if info.is_main and on_epoch_end is not None:
            on_epoch_end(progress.step, metrics)
        bar.write(progress_line(model_name, progress, budget, metrics))
    bar.close()
    if info.is_main and cfg.conservative_finetune_steps and not model.energy_from_gradient:
        tqdm.write(
            f"WARNING: train {model_name}: the run ended at step {progress.step}, before the "
            f"conservative fine-tune (step {conservative_from}): its checkpoints predict "
            "direct forces"
        )
    if info.is_main and progress.graphs_seen < n_train:
        tqdm.write(
            f"WARNING: train {model_name}: {progress.step} steps saw {progress.graphs_seen} "
            f"structures, {progress.graphs_seen / n_train:.2f} of one pass over the "
            f"{n_train} training frames: the model is under-trained (raise "
            "train.<model>.max_steps, or lower the model's size)"
        )
    best = out_dir / "best.pt"
    if best.is_file():
        return best
    if n_dev:  # not reached: every finite dev force MAE is tracked and saved
        raise RuntimeError(f"train {model_name}: a dev slice but no {best} was written")
    if info.is_main:
        tqdm.write(f"train {model_name}: no dev slice, so no best.pt: {last} is the checkpoint")
    return last


def _wrap(model: C.ScaledModel, info: D.DistInfo) -> nn.Module:
    """``model`` as trained: itself, or under DDP wrapped in DistributedDataParallel."""
    if not info.distributed:
        return model
    ids = [info.device] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _conservative_start(
    cfg: TrainConfig, model: C.ScaledModel, step: int, budget: int, last: Path
) -> int:
    """The step where the conservative fine-tune starts (``budget`` without one); a
    ValueError when it does not fit the budget, a CheckpointError for a resumed
    ``last.pt`` already in that phase before it starts (other settings)."""
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


def _record_eval(progress: Progress, metrics: dict[str, float], steps_per_epoch: int) -> None:
    """Close the epoch if it is complete, add ``epoch`` (fractional) to ``metrics`` and
    track the best dev force MAE; a non-finite :data:`CHECKED_METRICS` one raises
    :class:`NonFiniteError` naming it and the step, before anything is saved."""
    bad = [k for k in CHECKED_METRICS if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        what = ", ".join(f"{'' if k == 'train_loss' else 'dev '}{k} is {metrics[k]}" for k in bad)
        raise NonFiniteError(f"{what} at step {progress.step}")
    if progress.batches_in_epoch == steps_per_epoch:
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
    metrics["epoch"] = progress.epoch + progress.batches_in_epoch / steps_per_epoch
    mae = metrics.get("forces_mae")
    if mae is not None and (progress.best_metric is None or mae < progress.best_metric):
        progress.best_metric = mae


def _train_epoch(
    cfg: TrainConfig,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: TrainLoss,
    train_set: Dataset,
    progress: Progress,
    info: D.DistInfo,
    steps_per_epoch: int,
    budget: int,
    clock0: float,
    bar: StepLog,
    graphs: OnTheFlyGraphs | None = None,
) -> dict[str, float]:
    """Train the rest of the current epoch, or up to the next dev evaluation
    (``cfg.eval_every``), step ``budget`` (the step budget, or the start of the
    conservative fine-tune) or the wall-clock cap."""
    indices = D.epoch_indices(
        dataset_size(train_set),
        epoch=progress.epoch,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
    )[progress.batches_in_epoch * cfg.batch_size :]
    epoch_set = Subset(train_set, indices)
    loader = batch_loader(
        epoch_set,
        SequentialSampler(epoch_set),
        batch_size=cfg.batch_size,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=info.device.type == "cuda",
    )
    # bf16 autocast only for direct-force models: double backward through bf16 is too lossy
    amp = cfg.amp and not getattr(_unwrap(net), "energy_from_gradient", False)
    loss_sum, n_steps, n_graphs, t_start = 0.0, 0, 0, _now()
    for batch in loader:
        progress.elapsed_s = D.sync_max(_now() - clock0)
        if cfg.time_budget_s > 0 and progress.elapsed_s >= cfg.time_budget_s:
            break
        frac = budget_progress(
            progress.step,
            steps_per_epoch,
            cfg.max_epochs,
            progress.elapsed_s,
            cfg.time_budget_s,
            cfg.max_steps,
        )
        lr = cfg.lr * lr_factor(
            progress.step,
            frac,
            warmup_steps=cfg.warmup_steps,
            warmup_start=cfg.warmup_start,
            decay=cfg.lr_decay,
            milestones=cfg.milestones,
            gamma=cfg.gamma,
            min_factor=cfg.min_lr_factor,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        if graphs is not None:  # edges first, from the stored (unrotated) positions
            batch = graphs(batch_to(batch, info.device))
        if cfg.rotation_augment:
            gen = torch.Generator().manual_seed(
                (cfg.seed * 1_000_003 + progress.step) * info.world_size + info.rank
            )
            batch = rotate_batch(batch, random_rotations(len(batch[K.NATOMS]), gen))
        batch = batch_to(batch, info.device)
        diag = train_step(net, batch, optimizer, loss_fn=loss_fn, amp=amp, clip_grad=cfg.clip_grad)
        progress.step += 1
        progress.batches_in_epoch += 1
        loss_sum, n_steps = loss_sum + diag["loss"], n_steps + 1
        n_graphs += len(batch[K.NATOMS]) * info.world_size
        progress.graphs_seen += len(batch[K.NATOMS]) * info.world_size
        rate = n_graphs / max(_now() - t_start, 1e-9)
        bar.step(progress.step, loss=diag["loss"], graphs_per_s=rate, lr=lr)
        if progress.step >= budget or (cfg.eval_every and progress.step % cfg.eval_every == 0):
            break
    progress.elapsed_s = D.sync_max(_now() - clock0)
    return {
        "train_loss": loss_sum / max(n_steps, 1),
        "step": float(progress.step),
        "elapsed_s": progress.elapsed_s,
        "graphs_seen": float(progress.graphs_seen),
        "graphs_per_s": n_graphs / max(_now() - t_start, 1e-9),
        "lr": lr if n_steps else 0.0,
    }


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net
