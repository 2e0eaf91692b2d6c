"""Every figure the report and the benchmarks draw is legible at the size it is written:
no two of its texts (tick labels, axis labels, titles) cover each other, and every
numeric axis of a panel carries at least two tick labels."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("forcenet", "schnet", "dimenetpp", "gns")
SPLITS = ("val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")


def _texts(fig: Figure) -> list[Text]:
    """The visible, non-empty tick labels (major and minor, inside the view), axis labels
    and titles of ``fig``."""
    texts: list[Text] = []
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not lo <= tick.get_loc() <= hi:
                    continue
                texts += [t for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text()]
            if axis.label.get_text():
                texts.append(axis.label)
        if ax.title.get_text():
            texts.append(ax.title)
    suptitle = fig.get_suptitle()
    if suptitle:
        texts += [t for t in fig.texts if t.get_text() == suptitle]
    return texts


def overlapping_texts(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of texts of ``fig`` whose boxes overlap once drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _texts(fig)]
    return [
        (a, b)
        for k, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[k + 1 :]
        if box_a.overlaps(box_b)
    ]


def sparse_axes(fig: Figure) -> list[str]:
    """The axes of ``fig``'s visible panels with fewer than two tick labels in view
    (a reader cannot read a scale off one)."""
    sparse = []
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison or not ax.get_label() == "":
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            labels = {
                t.label1.get_text()
                for t in ticks
                if lo <= t.get_loc() <= hi and t.label1.get_text()
            }
            if len(labels) < 2:
                sparse.append(f"{ax.get_title()!r} {name}: {sorted(labels)}")
    return sparse


def problems(fig: Figure) -> list[str]:
    """What makes ``fig`` hard to read: texts that cover each other, scales with one label."""
    covered = [f"{a!r} covers {b!r}" for a, b in overlapping_texts(fig)]
    return covered + sparse_axes(fig)


@pytest.fixture
def drawn(monkeypatch):
    """Path -> :func:`problems` of every figure saved while the test runs."""
    found: dict[str, list[str]] = {}
    save = Figure.savefig

    def checked_save(self, fname, *args, **kwargs):
        # figures are written to a temporary name (.NAME.<pid>.<hex>.tmp) and renamed
        name = re.sub(r"^\.(.+)\.\d+\.[0-9a-f]+\.tmp$", r"\1", Path(str(fname)).name)
        found[name] = problems(self)
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_save)
    return found


def test_overlap_check_sees_crowded_labels(drawn, tmp_path):
    """The check finds labels that cover each other (or the tests below prove nothing)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks([0.0, 0.01], ["a long tick label", "another long one"])
    fig.savefig(tmp_path / "crowded.png")
    plt.close(fig)
    assert drawn["crowded.png"] != []


def test_accuracy_figure_labels_stand_apart(drawn, tmp_path):
    """Log axes over less than two decades (compute 150-2,400 s, widths 64-256) carry
    plain labels that do not run into each other."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_accuracy

    budgets, widths = {}, {}
    for k, model in enumerate(MODELS):
        for budget in (1, 4, 16):
            budgets[f"{model}@{budget}x"] = {
                "model": model,
                "budget": float(budget),
                "compute_seconds": 150.0 * budget * (1 + 0.01 * k),
                "forces_mae": 0.05 * (1 + 0.3 * k) / budget**0.5,
                "forces_mae_adsorbate": 0.12 * (1 + 0.2 * k) / budget**0.5,
            }
    for k, width in enumerate((64, 128, 256)):
        widths[f"h{width}"] = {
            "model": "forcenet",
            "width": width,
            "steps": 3720 // 2**k,
            "forces_mae": 0.05 * 1.25**k,
            "forces_mae_adsorbate": 0.12 * 1.3**k,
        }
    results = {
        "budgets": budgets,
        "widths": widths,
        "zero_baseline": {"zero_forces_mae": 0.114, "zero_forces_mae_adsorbate": 0.214},
    }
    bench_accuracy.plot(results, tmp_path / "accuracy_vs_compute.png")
    assert drawn == {"accuracy_vs_compute.png": []}


def _metrics_table() -> pd.DataFrame:
    rows = []
    for k, model in enumerate(MODELS):
        for j, split in enumerate(SPLITS):
            rows.append(
                {
                    "model": model,
                    "split": split,
                    "forces_mae": 0.05 + 0.01 * k + 0.002 * j,
                    "forces_mae_surface": 0.04 + 0.01 * k,
                    "forces_mae_adsorbate": 0.12 + 0.02 * k,
                    "zero_forces_mae": 0.114,
                    "zero_forces_mae_surface": 0.098,
                    "zero_forces_mae_adsorbate": 0.214 + 0.02 * j,
                }
            )
    return pd.DataFrame(rows)


def _curves() -> pd.DataFrame:
    rows = []
    for k, model in enumerate(MODELS):
        for step in range(300, 3800, 300):
            for metric, value in (
                ("forces_mae", 0.1 * 3000 / (step + 3000) + 0.01 * k),
                ("forces_mae_adsorbate", 0.25 * 3000 / (step + 3000)),
                ("train_loss", 10.0 ** (1 - k) * 300 / step),
                ("elapsed_s", step * (0.04 + 0.05 * k)),
                ("zero_forces_mae", 0.123),
                ("zero_forces_mae_adsorbate", 0.26),
            ):
                rows.append({"model": model, "step": step, "metric": metric, "value": value})
    return pd.DataFrame(rows)


def _predictions() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 400
    frames = []
    for split in SPLITS:
        true = rng.normal(size=(n, 3))
        frame = pd.DataFrame(true, columns=["fx", "fy", "fz"])
        pred = true + 0.1 * rng.normal(size=(n, 3))
        frame[["pred_fx", "pred_fy", "pred_fz"]] = pred
        frame["split"], frame["model"], frame["fixed"] = split, "forcenet", False
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_report_figures_labels_stand_apart(drawn, tmp_path):
    from pipeline.plots import (
        plot_force_mae_bars,
        plot_force_mae_by_tag,
        plot_learning_curves,
        plot_parity,
    )

    table = _metrics_table()
    plot_force_mae_bars(table, tmp_path / "force_mae_by_split.png")
    assert plot_force_mae_by_tag(table, tmp_path / "force_mae_by_tag.png")
    assert plot_learning_curves(_curves(), tmp_path / "learning_curves.png")
    plot_parity(_predictions(), "forcenet", tmp_path / "parity_forcenet.png")
    assert drawn == {
        "force_mae_by_split.png": [],
        "force_mae_by_tag.png": [],
        "learning_curves.png": [],
        "parity_forcenet.png": [],
    }


def test_md_energy_figure_labels_stand_apart(drawn, tmp_path):
    """Four models and the oracle, two MD runs each."""
    from forcenet.physics.md import plot_md_energy

    time_ps = np.linspace(0.0, 0.125, 26)
    rows = []
    for k, model in enumerate((*MODELS, "oracle")):
        for j, name in enumerate(("val_id:1000006", "val_ood_ads:2000000")):
            scale = 1e-5 if model == "oracle" else 0.05 * (k + 1)
            for t in time_ps:
                rows.append(
                    {
                        "model": model,
                        "name": name,
                        "time_ps": t,
                        "n_free": 10,
                        "oracle_total_eV": 10 * scale * np.sin(20 * t + j),
                        "model_total_eV": np.nan if k in (0, 3) else 0.01 * t,
                    }
                )
    plot_md_energy(pd.DataFrame(rows), tmp_path / "md_energy.png")
    assert drawn == {"md_energy.png": []}


def test_relaxation_figure_labels_stand_apart(drawn, tmp_path):
    """Four splits; energies above the minimum over three decades (a symmetric-log axis)
    in two of them, within one decade in the others."""
    from ase.build import fcc111
    from ase.constraints import FixAtoms
    from ase.io import Trajectory

    from forcenet.oracle import oracle_check, plot_oracle_energy

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=list(range(4))))
    rows = []
    for j, split in enumerate(SPLITS):
        path = tmp_path / f"{split}.traj"
        with Trajectory(str(path), "w") as traj:
            for step in range(8):
                image = slab.copy()
                image.positions[4:, 2] += 0.3 * 0.5**step
                traj.write(image)
        _, last = oracle_check(image)
        rows.append(
            {
                "model": "forcenet",
                "split": split,
                "sid": 1000000 * (j + 1),
                "trajectory": str(path),
                "oracle_min_energy": last - (1e-3 if j % 2 else 3.0),
            }
        )
    plot_oracle_energy(pd.DataFrame(rows), tmp_path / "relax_forcenet.png")
    assert drawn == {"relax_forcenet.png": []}
