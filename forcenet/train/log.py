"""What the training loop tells a person: a start line (data sizes, normalisation), a
tqdm bar on a terminal or plain lines in a log file, one line per dev evaluation, and the
warnings of a run that ended short."""

from __future__ import annotations

import sys

from tqdm import tqdm

from forcenet.scaling import ScaledModel, describe_element_energies
from forcenet.train.config import TrainConfig
from forcenet.train.state import Progress


def start_line(
    name: str, cfg: TrainConfig, model: ScaledModel, n_train: int, n_dev: int, *, resumed: bool
) -> str:
    """One plain line at the start: data sizes and the label normalisation in use."""
    refs = {z: float(v) for z, v in enumerate(model.element_energies.tolist()) if v != 0.0}
    parts = [
        f"train {name}: {'resumed, ' if resumed else ''}{n_train} training frames, {n_dev} dev",
        f"force scale {float(model.force_scale):.4g} eV/Å",
        f"energy reference {cfg.energy_reference}",
    ]
    if refs:
        source = {"isolated": "isolated atoms"}.get(cfg.energy_reference, "fitted")
        source = "given" if cfg.element_energies and source == "fitted" else source
        parts.append(f"e_Z ({source}) {describe_element_energies(refs)}")
    parts.append(
        f"energy shift {float(model.energy_shift):.6g} eV, scale {float(model.energy_scale):.4g} eV"
    )
    return ", ".join(parts)


class StepLog:
    """The training loop's progress: on a terminal a tqdm bar toward the step budget; in a
    log file (no terminal) a plain line every ``budget / 20`` steps instead of a bar
    redrawn at every step. Evaluation lines (:meth:`write`) go to both."""

    def __init__(self, name: str, budget: int, initial: int, *, enabled: bool) -> None:
        self.name, self.budget, self.enabled = name, budget, enabled
        self.interactive = sys.stderr.isatty()
        self.every = max(1, budget // 20)
        self.bar = tqdm(
            total=budget,
            initial=initial,
            disable=not (enabled and self.interactive),
            desc=f"train {name}",
            mininterval=1.0,
            dynamic_ncols=True,
        )

    def step(self, step: int, *, loss: float, graphs_per_s: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", graphs_s=f"{graphs_per_s:.1f}", lr=f"{lr:.2e}")
        if self.enabled and not self.interactive and step % self.every == 0:
            print(
                f"train {self.name}: step {step}/{self.budget}, loss {loss:.4f}, "
                f"{graphs_per_s:.1f} graphs/s, lr {lr:.2e}",
                flush=True,
            )

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()


def progress_line(name: str, progress: Progress, budget: int, metrics: dict) -> str:
    """One plain line per dev evaluation (readable in a log file)."""
    parts = [f"train {name}: step {progress.step}/{budget}", f"{progress.elapsed_s:.0f} s"]
    for key, label in (("train_loss", "loss"), ("forces_mae", "dev force MAE"), ("lr", "lr")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.4g}")
    return ", ".join(parts)


def fine_tune_line(name: str, step: int, budget: int, model: ScaledModel) -> str:
    """The line that marks the switch to the conservative fine-tune."""
    return (
        f"train {name}: step {step}: conservative fine-tune, forces = -dE/dx for the last "
        f"{budget - step} steps, energy scale {float(model.energy_scale):.4g} eV (= the force "
        "scale); best.pt from this phase only"
    )


def end_warnings(
    name: str,
    cfg: TrainConfig,
    model: ScaledModel,
    progress: Progress,
    switch_at: int,
    n_train: int,
) -> list[str]:
    """What a finished run must not hide: a fine-tune it never reached, too few steps."""
    lines = []
    if cfg.conservative_finetune_steps and not model.energy_from_gradient:
        lines.append(
            f"WARNING: train {name}: the run ended at step {progress.step}, before the "
            f"conservative fine-tune (step {switch_at}): its checkpoints predict direct forces"
        )
    if progress.graphs_seen < n_train:
        lines.append(
            f"WARNING: train {name}: {progress.step} steps saw {progress.graphs_seen} "
            f"structures, {progress.graphs_seen / n_train:.2f} of one pass over the "
            f"{n_train} training frames: the model is under-trained (raise "
            "train.<model>.max_steps, or lower the model's size)"
        )
    return lines
