"""Accuracy against training compute: every model at several step budgets, and ForceNet's
width at a fixed compute -> reports/benchmarks/accuracy.json and
reports/benchmarks/accuracy_vs_compute.png.

Each point trains a model with the ``params.yaml`` settings (model, recipe, seed) on the
default run's stores (``data/lmdb``, ``data/graphs``; run ``make repro`` first), with
``max_steps`` = the model's ``train.<model>.max_steps`` times a budget factor, and
evaluates its ``best.pt`` on ``val_id``: force MAE overall and on adsorbate atoms, against
the training seconds the run spent. The budget is in steps, so the weights and the MAE
do not depend on the machine's load; the seconds do, so run it alone.

The width panel trains ForceNet at ``model.hidden`` = each ``--widths`` value with the
steps scaled so that every width gets the training seconds of the default width at budget
1: the seconds per step of each width are timed first on 60 steps.

Points already in the output JSON are kept (the sweep resumes after an interruption).
The full sweep (1x, 4x, 16x, 4 models, 3 widths) takes about 2.5 hours on 2 CPU cores:

    .venv/bin/python benchmarks/bench_accuracy.py
    .venv/bin/python benchmarks/bench_accuracy.py --budgets 1 4 --models forcenet schnet
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet.atomic import atomic_write, write_text  # noqa: E402
from forcenet.data import keys as K  # noqa: E402
from forcenet.evaluate import evaluate_checkpoint  # noqa: E402
from forcenet.runtime import tune_malloc  # noqa: E402
from forcenet.train import fit  # noqa: E402
from pipeline.params import MODEL_NAMES, load_params, params_from_mapping  # noqa: E402
from pipeline.train import model_kwargs, train_config  # noqa: E402


def _train_and_score(params, name: str, steps: int, data: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time
    kwargs = model_kwargs(params, name)
    cfg = dataclasses.replace(train_config(params, name), max_steps=steps)
    best = fit(
        cfg,
        name,
        kwargs,
        train_dir=data / "lmdb" / K.TRAIN,
        graphs_dir=data / "graphs" / K.TRAIN,
        out_dir=out,
    )
    table = evaluate_checkpoint(best, [data / "lmdb" / "val_id"], graphs=data / "graphs")
    values = {(row.split, row.metric): float(row.value) for row in table.itertuples(index=False)}
    return {
        "model": name,
        "steps": steps,
        "train_seconds": values[("training", "train_seconds")],
        "forces_mae": values[("val_id", "forces_mae")],
        "forces_mae_adsorbate": values.get(("val_id", "forces_mae_adsorbate"), float("nan")),
    }


def _with_width(raw: dict, width: int):
    raw = json.loads(json.dumps(raw))
    raw["model"]["hidden"] = width
    return params_from_mapping(raw)


def _seconds_per_step(params, data: Path, work: Path, steps: int = 60) -> float:
    """Training seconds per step of ForceNet with ``params`` (the run's own clock, which
    leaves out start-up and evaluation), from a short run."""
    return _train_and_score(params, "forcenet", steps, data, work)["train_seconds"] / steps


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name in MODEL_NAMES:
        points = sorted(
            (p for p in results["budgets"].values() if p["model"] == name),
            key=lambda p: p["train_seconds"],
        )
        if not points:
            continue
        seconds = [p["train_seconds"] for p in points]
        axes[0].plot(seconds, [p["forces_mae"] for p in points], "o-", label=name)
        axes[1].plot(seconds, [p["forces_mae_adsorbate"] for p in points], "o-", label=name)
    titles = ("val_id force MAE", "val_id adsorbate force MAE")
    for ax, title in zip(axes[:2], titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="training seconds (2 CPU cores)")
        ax.set(ylabel="eV/Å", title=title)
        ax.legend()
    widths = sorted(results["widths"].values(), key=lambda p: p["width"])
    if widths:
        axes[2].plot([p["width"] for p in widths], [p["forces_mae"] for p in widths], "o-")
        axes[2].plot(
            [p["width"] for p in widths], [p["forces_mae_adsorbate"] for p in widths], "s--"
        )
        axes[2].legend(["overall", "adsorbate"])
        axes[2].set(xscale="log", yscale="log", xlabel="ForceNet width (hidden channels)")
        axes[2].set(ylabel="eV/Å", title="ForceNet width at fixed compute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--work", type=Path, default=Path("/tmp/forcenet_accuracy"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/accuracy.json")
    parser.add_argument(
        "--plot", type=Path, default=ROOT / "reports/benchmarks/accuracy_vs_compute.png"
    )
    args = parser.parse_args()
    tune_malloc()
    params = load_params(args.params)
    raw = yaml.safe_load(args.params.read_text())
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("budgets", {})
    results.setdefault("widths", {})
    for name in args.models:
        base = train_config(params, name).max_steps
        for factor in args.budgets:
            key = f"{name}@{factor:g}x"
            if key in results["budgets"]:
                continue
            steps = max(1, round(base * factor))
            print(f"bench_accuracy: {key}: {steps} steps", flush=True)
            point = _train_and_score(params, name, steps, args.data, args.work / key)
            results["budgets"][key] = {**point, "budget": factor}
            _save(results, args.out)
    if args.widths:
        reference = train_config(params, "forcenet").max_steps
        per_step = {
            w: _seconds_per_step(_with_width(raw, w), args.data, args.work / f"time_h{w}")
            for w in args.widths
            if f"h{w}" not in results["widths"]
        }
        default = raw["model"]["hidden"]
        ref_step = per_step.get(default) or _seconds_per_step(
            _with_width(raw, default), args.data, args.work / f"time_h{default}"
        )
        for width, seconds in per_step.items():
            steps = max(1, round(reference * ref_step / seconds))
            print(f"bench_accuracy: ForceNet h{width}: {steps} steps", flush=True)
            point = _train_and_score(
                _with_width(raw, width), "forcenet", steps, args.data, args.work / f"h{width}"
            )
            results["widths"][f"h{width}"] = {**point, "width": width}
            _save(results, args.out)
    plot(results, args.plot)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
