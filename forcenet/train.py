"""Training as plain functions: ``train_step``, ``evaluate``, ``fit``.

``fit`` trains one model on the training split minus a *dev slice* (a deterministic
fraction of the training systems, by ``sid``) that drives model selection (``best.pt``)
and diagnostics; the validation splits are never touched here. It checkpoints every epoch
and at the end of the budget (``out_dir/last.pt``; ``best.pt`` by dev force MAE,
``forces_mae``), resumes exactly (step counter, epoch, position inside the epoch, RNG
states) and runs under torchrun (DDP). The budget is a number of optimizer steps (``max_steps``), so that the same params,
seed and thread count give the same weights whatever else the machine is doing; an epoch
cap and an opt-in wall-clock cap end a run earlier if they bind first.

Labels are normalised by constants from the training set (force scale = RMS of the
free-atom force components; energy mean/std per structure), stored as buffers of the
:class:`forcenet.checkpoint.ScaledModel` wrapper so the saved model predicts physical units.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from forcenet import checkpoint as C
from forcenet import distributed as D
from forcenet.data import keys as K
from forcenet.data.batch import Batch, batch_to, collate
from forcenet.geometry import random_rotations, rotate_batch
from forcenet.losses import ForceLossKind, LossAtoms, TrainLoss
from forcenet.metrics import OC20Metrics
from forcenet.runtime import tune_malloc
from forcenet.schedule import LrDecay, budget_progress, lr_factor, total_steps

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (params.yaml ``train.<model>``); units in brackets.

    Optimiser AdamW(``lr``, ``weight_decay``). Schedule: linear warm-up over
    ``warmup_steps`` from ``warmup_start * lr``, then ``lr_decay`` (cosine to
    ``min_lr_factor * lr``, or x ``gamma`` at each of ``milestones``, fractions of the
    budget). Budget: ``max_steps`` optimizer steps (0 = none), capped by ``max_epochs``
    and by the opt-in wall-clock cap ``time_budget_s`` [s] (0 = none), whichever ends
    first; only a step or epoch budget is reproducible. ``eval_every``: dev evaluation
    (and ``last.pt``) every that many steps, besides each epoch end (0 = epoch ends only). Loss: ``force_loss`` on forces divided by the force scale, per-atom weights
    from ``loss_atoms`` (``tag_weights`` for tags 0/1/2, or free atoms only; ``loss_beta``
    is the smooth_l1/berhu transition in normalised units; ``adsorbate_loss``, when set, is
    the loss of adsorbate atoms, tag 2, instead of ``force_loss``, and ``adsorbate_beta``
    its transition), plus
    ``energy_coef`` x L1 on normalised energies for models with an energy.
    ``clip_grad`` [normalised units] 0 = off. ``rotation_augment``: a random SO(3) rotation
    of every training structure (pos, cell, forces) at each draw. ``amp``: bf16 autocast,
    CUDA and direct-force models only. ``dev_fraction``: share of training systems held out.
    """

    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    warmup_start: float = 0.1
    lr_decay: LrDecay = "cosine"
    milestones: tuple[float, ...] = (0.6, 0.85)
    gamma: float = 0.1
    min_lr_factor: float = 0.02
    batch_size: int = 16
    eval_batch_size: int = 32
    max_epochs: int = 100
    max_steps: int = 0
    eval_every: int = 0
    time_budget_s: float = 0.0
    force_loss: ForceLossKind = "l1"
    adsorbate_loss: ForceLossKind | None = None
    loss_beta: float = 1.0
    adsorbate_beta: float | None = None
    loss_atoms: LossAtoms = "tag_weighted"
    tag_weights: tuple[float, ...] = (0.05, 1.0, 1.0)
    force_coef: float = 1.0
    energy_coef: float = 0.0
    clip_grad: float = 10.0
    rotation_augment: bool = True
    amp: bool = True
    dev_fraction: float = 0.1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "lr > 0": self.lr > 0,
            "batch_size >= 1": self.batch_size >= 1,
            "max_epochs >= 1": self.max_epochs >= 1,
            "max_steps >= 0": self.max_steps >= 0,
            "eval_every >= 0": self.eval_every >= 0,
            "time_budget_s >= 0": self.time_budget_s >= 0,
            "0 <= dev_fraction < 1": 0 <= self.dev_fraction < 1,
            "warmup_steps >= 0": self.warmup_steps >= 0,
            "loss_beta > 0": self.loss_beta > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig: need {', '.join(bad)}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "tag_weights", tuple(float(w) for w in self.tag_weights))


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
        raise FloatingPointError(f"non-finite training loss {loss.item()}")
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    diag = {"loss": float(loss.detach())}
    for k, n in enumerate(names):
        diag[f"loss_{n}"] = float(terms[n].total.detach()) / max(float(weights[k]) * world, 1e-12)
    diag["grad_norm"] = float(grad_norm)
    return diag


def evaluate(
    model: nn.Module, loader: DataLoader, *, device: torch.device | str
) -> dict[str, float]:
    """The OC20 metrics of :class:`forcenet.metrics.OC20Metrics` over ``loader``, exact
    float64 sums over free atoms, summed over ranks (each rank a non-padded shard).

    The dev metrics are thus named as in the evaluation: ``forces_mae`` (eV/Å, the
    selection metric), ``zero_forces_mae``, ``forces_mae_surface``, ``forces_mae_adsorbate``,
    ``zero_forces_mae_surface``, ... (when the data have both tags), ``energy_mae`` (eV)
    when the model has an energy, ``num_free_atoms``, ``num_structures``.
    """
    model.eval()
    needs_grad = bool(getattr(model, "energy_from_gradient", False))
    acc = OC20Metrics()
    for batch in loader:
        batch = batch_to(batch, device)
        with torch.set_grad_enabled(needs_grad):
            out = model(batch)
        acc.update(out, batch)
    acc.load_state(D.all_reduce_sum(acc.state().to(device)))
    return acc.compute()


# --------------------------------------------------------------------------- data helpers


def dev_split(sids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices) with whole systems (``sid``) held out for the dev slice.

    A system is in the dev slice when a hash of (seed, sid) falls below ``fraction``, so the
    choice of one system does not depend on which other systems are present. With
    ``fraction`` > 0 at least one system (the smallest hash) is held out.
    """

    def unit(sid: int) -> float:
        digest = hashlib.blake2b(f"{seed}:{int(sid)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    systems = sorted({int(s) for s in sids})
    dev = {s for s in systems if unit(s) < fraction}
    if fraction > 0 and not dev and len(systems) > 1:
        dev = {min(systems, key=unit)}
    dev_idx = [i for i, s in enumerate(sids) if int(s) in dev]
    train_idx = [i for i, s in enumerate(sids) if int(s) not in dev]
    return train_idx, dev_idx


def label_stats(dataset: Dataset) -> dict[str, float]:
    """Normalisation constants of a training set.

    ``force_rms`` (eV/Å): root mean square of the free-atom force components (the std
    about the physical mean 0); ``energy_mean``/``energy_std`` (eV): of the referenced
    per-structure energies (std 1 if there is a single frame).
    """
    sq, n_comp, energies = 0.0, 0, []
    for i in range(len(dataset)):
        sample = dataset[i]
        free = ~np.asarray(sample[K.FIXED], dtype=bool)
        forces = np.asarray(sample[K.FORCES], dtype=np.float64)[free]
        sq += float(np.square(forces).sum())
        n_comp += forces.size
        energies.append(float(sample[K.ENERGY]))
    if n_comp == 0:
        raise ValueError("training set has no free atoms: cannot normalise forces")
    e = np.asarray(energies)
    std = float(e.std()) if len(e) > 1 and e.std() > 1e-8 else 1.0
    return {"force_rms": math.sqrt(sq / n_comp), "energy_mean": float(e.mean()), "energy_std": std}


def read_sids(frames_dir: Path) -> list[int]:
    """The ``sid`` of every frame of a frame store, in dataset order (frames only, no graphs)."""
    from forcenet.data.dataset import FrameDataset

    frames = FrameDataset(frames_dir)
    return [int(frames[i][K.SID]) for i in range(len(frames))]


# --------------------------------------------------------------------------- fit

_now = time.monotonic  # the clock of the wall-clock budget (tests replace it)


@dataclass
class _Progress:
    """Where training stands; restored from ``last.pt`` on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # index of the current epoch (= completed epochs)
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    elapsed_s: float = 0.0  # wall-clock seconds trained so far, over all restarts
    graphs_seen: int = 0  # training structures consumed, over all ranks
    best_metric: float | None = None  # best dev forces_mae (eV/Å)


def fit(
    cfg: TrainConfig,
    model_name: str,
    model_kwargs: dict[str, Any],
    *,
    train_dir: Path,
    graphs_dir: Path,
    out_dir: Path,
    graph: dict[str, float | int],
    resume: bool = False,
    params_snapshot: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train ``model_name`` on the frame store ``train_dir`` (+ graphs ``graphs_dir``).

    The dev slice (``cfg.dev_fraction`` of the training systems) is carved out here.
    ``graph``: ``{"cutoff", "max_neighbors"}`` the graphs were built with (recorded in the
    checkpoint). Returns the path of ``best.pt`` (lowest dev force MAE; ``last.pt`` when
    there is no dev slice). See :func:`fit_datasets` for the rest.
    """
    from forcenet.data.dataset import FrameDataset

    sids = read_sids(Path(train_dir))
    train_idx, dev_idx = dev_split(sids, cfg.dev_fraction, cfg.seed)
    full = FrameDataset(Path(train_dir), Path(graphs_dir))
    return fit_datasets(
        cfg,
        model_name,
        model_kwargs,
        train_set=Subset(full, train_idx),
        dev_set=Subset(full, dev_idx),
        out_dir=out_dir,
        graph=graph,
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
    graph: dict[str, float | int],
    resume: bool = False,
    params_snapshot: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> Path:
    """Train on ``train_set``, select on ``dev_set``; checkpoints in ``out_dir``.

    ``resume``: continue from ``out_dir/last.pt`` if it exists (same model name and
    kwargs required), reaching the same weights as an uninterrupted run. ``on_epoch_end``
    (rank 0 only) gets (epoch number, metrics) after each epoch and at the budget end,
    after the checkpoint is written. Under DDP every rank calls this with the same data.
    """
    info = D.init_distributed()
    if info.device.type == "cpu":
        tune_malloc()  # keep large activations mapped across steps (forcenet.runtime)
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    ckpt = C.load_checkpoint(last) if resume and last.is_file() else None
    torch.manual_seed(cfg.seed)
    model = C.build_scaled_model(model_name, model_kwargs)
    progress = _Progress()
    if ckpt is None:
        _set_scales(model, label_stats(train_set))
    else:
        _check_same_model(last, ckpt, model_name, model_kwargs)
        model.load_state_dict(ckpt["model_state"])
    model.to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer_state"])
        progress = _Progress(**ckpt["train_info"]["progress"])
        C.restore_rng(ckpt["rng"])
    loss_fn = _make_loss(cfg, model)
    net = model
    if info.distributed:
        ids = [info.device] if info.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    shard = D.shard_indices(len(dev_set), info.rank, info.world_size)
    dev_loader = DataLoader(
        Subset(dev_set, shard), batch_size=cfg.eval_batch_size, collate_fn=collate
    )
    steps_per_epoch = math.ceil(len(train_set) / info.world_size) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"training set of {len(train_set)} frames < batch_size {cfg.batch_size}")

    def save(metrics: dict[str, float]) -> None:
        state = C.training_state(
            model,
            optimizer,
            model_name=model_name,
            model_kwargs=model_kwargs,
            progress=vars(progress),
            params=params_snapshot or {},
            graph=graph,
            metrics=metrics,
            base_lr=cfg.lr,
        )
        C.save_checkpoint(last, state)
        if progress.best_metric is not None and metrics.get("forces_mae") == progress.best_metric:
            C.save_checkpoint(out_dir / "best.pt", state)

    budget = total_steps(steps_per_epoch, cfg.max_epochs, cfg.max_steps)
    bar = tqdm(
        total=budget,
        initial=progress.step,
        disable=not info.is_main,
        desc=f"train {model_name}",
        mininterval=1.0,
        dynamic_ncols=True,
    )
    clock0 = _now() - progress.elapsed_s

    def out_of_time() -> bool:
        return cfg.time_budget_s > 0 and D.sync_max(_now() - clock0) >= cfg.time_budget_s

    while progress.step < budget and not out_of_time():
        done = _train_epoch(
            cfg,
            net,
            optimizer,
            loss_fn,
            train_set,
            progress,
            info,
            steps_per_epoch,
            budget,
            clock0,
            bar,
        )
        metrics = evaluate(model, dev_loader, device=info.device) if len(dev_set) else {}
        metrics.update(done)
        if progress.batches_in_epoch == steps_per_epoch:
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
        metrics["epoch"] = progress.epoch + progress.batches_in_epoch / steps_per_epoch
        mae = metrics.get("forces_mae")
        if mae is not None and not math.isfinite(mae):
            raise FloatingPointError(
                f"train {model_name}: dev force MAE is {mae} at step {progress.step}"
            )
        if mae is not None and (progress.best_metric is None or mae < progress.best_metric):
            progress.best_metric = mae
        if info.is_main:
            save(metrics)
        D.barrier()
        if info.is_main and on_epoch_end is not None:
            on_epoch_end(progress.step, metrics)
        if info.is_main and not bar.disable:
            bar.write(_progress_line(model_name, progress, budget, metrics))
    bar.close()
    best = out_dir / "best.pt"
    return best if best.is_file() else last


def _train_epoch(
    cfg: TrainConfig,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: TrainLoss,
    train_set: Dataset,
    progress: _Progress,
    info: D.DistInfo,
    steps_per_epoch: int,
    budget: int,
    clock0: float,
    bar: tqdm,
) -> dict[str, float]:
    """Train the rest of the current epoch, or up to the next dev evaluation
    (``cfg.eval_every``), the step budget ``budget`` or the wall-clock cap."""
    indices = D.epoch_indices(
        len(train_set),
        epoch=progress.epoch,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
    )[progress.batches_in_epoch * cfg.batch_size :]
    loader = DataLoader(
        Subset(train_set, indices),
        batch_size=cfg.batch_size,
        drop_last=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
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
        bar.update(1)
        bar.set_postfix(loss=f"{diag['loss']:.4f}", graphs_s=f"{rate:.1f}", lr=f"{lr:.2e}")
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


def _progress_line(name: str, progress: _Progress, budget: int, metrics: dict) -> str:
    """One plain line per dev evaluation (readable in a log file)."""
    parts = [f"train {name}: step {progress.step}/{budget}", f"{progress.elapsed_s:.0f} s"]
    for key, label in (("train_loss", "loss"), ("forces_mae", "dev force MAE"), ("lr", "lr")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.4g}")
    return ", ".join(parts)


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net


def _set_scales(model: C.ScaledModel, stats: dict[str, float]) -> None:
    """Put the training-set normalisation into the wrapper's buffers.

    Direct-force models: forces scaled by the force RMS. Gradient-force models: energy and
    forces share one scale (forces are -dE/dpos), the force RMS, so forces start O(1).
    """
    model.force_scale.fill_(stats["force_rms"])
    model.energy_shift.fill_(stats["energy_mean"])
    e_scale = stats["force_rms"] if model.energy_from_gradient else stats["energy_std"]
    model.energy_scale.fill_(e_scale)


def _make_loss(cfg: TrainConfig, model: C.ScaledModel) -> TrainLoss:
    """The loss in the model's normalised units (the wrapper's scales)."""
    return TrainLoss(
        kind=cfg.force_loss,
        atoms=cfg.loss_atoms,
        tag_weights=cfg.tag_weights,
        force_coef=cfg.force_coef,
        energy_coef=cfg.energy_coef,
        force_scale=float(model.force_scale),
        energy_shift=float(model.energy_shift),
        energy_scale=float(model.energy_scale),
        beta=cfg.loss_beta,
        adsorbate_kind=cfg.adsorbate_loss,
        adsorbate_beta=cfg.adsorbate_beta,
    )


def _check_same_model(path: Path, ckpt: dict, name: str, kwargs: dict[str, Any]) -> None:
    if ckpt["model_name"] != name or dict(ckpt["model_kwargs"]) != dict(kwargs):
        raise C.CheckpointError(
            f"{path}: cannot resume: it holds {ckpt['model_name']!r} {ckpt['model_kwargs']}, "
            f"asked for {name!r} {kwargs}"
        )
