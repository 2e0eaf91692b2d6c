"""Accuracy against training compute: every model at several step budgets, and ForceNet's
width at a fixed compute -> reports/benchmarks/accuracy.json and
reports/benchmarks/accuracy_vs_compute.png.

Each point trains a model with the ``params.yaml`` settings (model, recipe, seed) on the
default run's stores (``data/lmdb``, ``data/graphs``; run ``make repro`` first), with
``max_steps`` = the model's ``train.<model>.max_steps`` times a budget factor, and
evaluates its ``best.pt`` on ``val_id``: force MAE overall and on adsorbate atoms.

The compute axis is ``steps x seconds per step``, the seconds per step of each model
timed alone on 2 threads (``reports/benchmarks/calibration.json``, the timing the step
budgets were set from; the widths are timed here the same way, before any point runs).
The budget is in steps, so the weights and the MAE do not depend on the machine's load,
and neither does the axis: the points may run side by side (``--jobs 2``, one thread
each). Each point also records the wall-clock seconds its run spent, for reference.

The width panel trains ForceNet at ``model.hidden`` = each ``--widths`` value with the
steps scaled so that every width gets the compute of the default width at budget 1.

Points already in the output JSON are kept, and a point that was interrupted continues
from its last checkpoint in ``--work`` (the sweep resumes after an interruption);
the 1x and 4x points and the widths run before the 16x ones. The full sweep (1x, 4x,
16x, 4 models, 3 widths) is about 5.5 hours of one core per job:

    .venv/bin/python benchmarks/bench_accuracy.py --jobs 2
    .venv/bin/python benchmarks/bench_accuracy.py --budgets 1 4 --models forcenet schnet
    .venv/bin/python benchmarks/bench_accuracy.py --plot-only

Every point is also logged to MLflow (experiment ``benchmarks``, one run per point,
tagged ``point``; ``--no-mlflow`` to skip), and the ``report`` stage puts the tables and
the figure into ``reports/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet.atomic import atomic_write, write_text  # noqa: E402
from forcenet.data import keys as K  # noqa: E402
from pipeline.params import MODEL_NAMES, params_from_mapping  # noqa: E402
from pipeline.plots import plain_log_ticks  # noqa: E402

#: Where the per-step timing of the models comes from (benchmarks/calibrate_steps.py).
CALIBRATION = ROOT / "reports/benchmarks/calibration.json"


def _train_and_score(raw: dict, name: str, steps: int, data: Path, out: Path) -> dict:
    """Train ``name`` for ``steps`` steps with the params mapping ``raw``; val_id MAEs."""
    from forcenet.evaluate import evaluate_checkpoint
    from forcenet.train import fit
    from pipeline.train import model_kwargs, train_config

    params = params_from_mapping(raw)
    # an interrupted point continues from its last checkpoint when it was started with
    # exactly these settings (training resumes exactly); anything else starts afresh
    job = json.dumps({"raw": raw, "name": name, "steps": steps}, sort_keys=True)
    marker = out / "job.json"
    if not (marker.is_file() and marker.read_text() == job):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        write_text(marker, job)
    kwargs = model_kwargs(params, name)
    # the budget is the step count: the max_epochs cap of params.yaml must not cut it short
    cfg = dataclasses.replace(train_config(params, name), max_steps=steps, max_epochs=10**6)
    # checkpoints hold no wall clock: the seconds of this point, over its resumed runs,
    # are kept beside them (the callback's elapsed_s counts this run only)
    clock = out / "train_seconds.txt"
    before = float(clock.read_text()) if clock.is_file() else 0.0

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        write_text(clock, f"{before + metrics['elapsed_s']!r}\n")

    best = fit(
        cfg,
        name,
        kwargs,
        train_dir=data / "lmdb" / K.TRAIN,
        graphs_dir=data / "graphs" / K.TRAIN,
        out_dir=out,
        resume=True,
        on_epoch_end=on_eval,
    )
    table = evaluate_checkpoint(best, [data / "lmdb" / "val_id"], graphs=data / "graphs")
    values = {(row.split, row.metric): float(row.value) for row in table.itertuples(index=False)}
    return {
        "model": name,
        "steps": int(values[("training", "train_steps")]),
        "train_seconds": float(clock.read_text()) if clock.is_file() else float("nan"),
        "forces_mae": values[("val_id", "forces_mae")],
        "forces_mae_adsorbate": values.get(("val_id", "forces_mae_adsorbate"), float("nan")),
    }


def _run_point(job: dict) -> tuple[str, str, dict]:
    """One sweep point in a worker process with ``job["threads"]`` torch threads."""
    import torch

    from forcenet.runtime import tune_malloc

    torch.set_num_threads(job["threads"])
    tune_malloc()
    point = _train_and_score(
        job["raw"],
        job["model"],
        job["steps"],
        Path(job["data"]),
        Path(job["work"]),
    )
    return job["group"], job["key"], {**point, **job["extra"], "threads": job["threads"]}


def _with_width(raw: dict, width: int) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["model"]["hidden"] = width
    return raw


def _model_timing(raw: dict) -> dict[str, float]:
    """Seconds per step of each model from calibration.json, checked against params.yaml:
    the calibration must describe the batch size the sweep trains with."""
    if not CALIBRATION.is_file():
        raise SystemExit(f"{CALIBRATION}: missing; run benchmarks/calibrate_steps.py alone first")
    cal = json.loads(CALIBRATION.read_text())
    timing = {}
    for name in MODEL_NAMES:
        entry = cal["models"].get(name)
        if entry is None:
            raise SystemExit(f"{CALIBRATION}: no timing for {name}; rerun calibrate_steps.py")
        batch = raw["train"][name]["batch_size"]
        if entry["batch_size"] != batch:
            raise SystemExit(
                f"{CALIBRATION}: {name} timed at batch {entry['batch_size']}, params.yaml "
                f"trains at {batch}; rerun benchmarks/calibrate_steps.py"
            )
        timing[name] = float(entry["seconds_per_step"])
    return timing


def _width_timing(raw: dict, widths: list[int], data: Path, threads: int) -> dict[str, float]:
    """Seconds per ForceNet step at each width, timed as calibrate_steps.py times a model."""
    import torch

    from benchmarks.calibrate_steps import DEFAULT_TIMED, TIMED, time_model
    from forcenet.data.dataset import FrameDataset

    torch.set_num_threads(threads)
    dataset = FrameDataset(data / "lmdb" / K.TRAIN, data / "graphs" / K.TRAIN)
    out = {}
    for width in widths:
        params = params_from_mapping(_with_width(raw, width))
        r = time_model("forcenet", params, dataset, timed=TIMED.get("forcenet", DEFAULT_TIMED))
        out[f"h{width}"] = r["seconds_per_step"]
        print(f"bench_accuracy: ForceNet h{width}: {r['seconds_per_step'] * 1e3:.1f} ms/step")
    return out


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2) + "\n")


def _with_compute(results: dict) -> None:
    """``compute_seconds`` = steps x timed seconds per step, for every point."""
    timing = results.get("timing", {})
    for p in results["budgets"].values():
        if p["model"] in timing.get("models", {}):
            p["compute_seconds"] = p["steps"] * timing["models"][p["model"]]
    for key, p in results["widths"].items():
        if key in timing.get("widths", {}):
            p["compute_seconds"] = p["steps"] * timing["widths"][key]


def _zero_baseline() -> dict[str, float]:
    """val_id MAE of predicting zero forces, from the default run's evaluation (the same
    for every model and point)."""
    import pandas as pd

    path = ROOT / "reports/eval/forcenet.parquet"
    if not path.is_file():
        return {}
    table = pd.read_parquet(path)
    rows = table[(table.split == "val_id") & table.metric.str.startswith("zero_forces_mae")]
    return {m: float(v) for m, v in zip(rows.metric, rows.value, strict=True)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for name in MODEL_NAMES:
        points = sorted(
            (
                p
                for p in results["budgets"].values()
                if p["model"] == name and "compute_seconds" in p
            ),
            key=lambda p: p["compute_seconds"],
        )
        if not points:
            continue
        seconds = [p["compute_seconds"] for p in points]
        axes[0].plot(seconds, [p["forces_mae"] for p in points], "o-", label=name)
        axes[1].plot(seconds, [p["forces_mae_adsorbate"] for p in points], "o-", label=name)
    titles = ("val_id force MAE", "val_id adsorbate force MAE")
    for ax, title, field in zip(
        axes[:2], titles, ("zero_forces_mae", "zero_forces_mae_adsorbate"), strict=True
    ):
        if field in results.get("zero_baseline", {}):
            ax.axhline(results["zero_baseline"][field], color="grey", ls=":", label="zero forces")
        ax.set(xscale="log", yscale="log", xlabel="training compute: steps × s/step (2 CPU cores)")
        ax.set(ylabel="eV/Å", title=title)
        plain_log_ticks(ax.xaxis)
        plain_log_ticks(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left")  # the curves fall from the upper left
    widths = sorted(results["widths"].values(), key=lambda p: p["width"])
    if not widths:
        axes[2].text(0.5, 0.5, "width points not run yet", ha="center", transform=axes[2].transAxes)
        axes[2].set_axis_off()
    else:
        w = [p["width"] for p in widths]
        axes[2].plot(w, [p["forces_mae"] for p in widths], "o-", label="overall")
        axes[2].plot(w, [p["forces_mae_adsorbate"] for p in widths], "s--", label="adsorbate")
        for p in widths:
            axes[2].annotate(
                f"{p['steps']} steps",
                (p["width"], p["forces_mae"]),
                fontsize="small",
                textcoords="offset points",
                xytext=(4, 4),
            )
        axes[2].legend()
        axes[2].set(xscale="log", yscale="log", xlabel="ForceNet width (hidden channels)")
        plain_log_ticks(axes[2].xaxis, at=w)
        plain_log_ticks(axes[2].yaxis)
        axes[2].set(ylabel="eV/Å", title="ForceNet width at the compute of 1x")
        axes[2].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def log_to_mlflow(results: dict, plot_path: Path, tracking_uri: str | None = None) -> int:
    """Every point as a run of MLflow's ``benchmarks`` experiment, tagged ``point``
    (``forcenet@16x``, ``width h128``); a point logged before is updated, not duplicated.
    The figure goes with each run. Returns the number of points logged."""
    from pipeline import tracking

    artifacts = [plot_path] if plot_path.is_file() else []
    points = list(results["budgets"].items())
    points += [(f"width {key}", p) for key, p in results["widths"].items()]
    for key, p in points:
        params = {k: p[k] for k in ("model", "budget", "width", "steps", "threads") if k in p}
        metrics = {
            "val_id/forces_mae": p["forces_mae"],
            "val_id/forces_mae_adsorbate": p["forces_mae_adsorbate"],
            "compute_seconds": p.get("compute_seconds", float("nan")),
            "train_seconds": p.get("train_seconds", float("nan")),
            "steps": float(p["steps"]),
        }
        tracking.log_benchmark_point(
            f"accuracy {key}",
            model=p["model"],
            params=params,
            metrics=metrics,
            artifacts=artifacts,
            tracking_uri=tracking_uri,
        )
    return len(points)


def _jobs(args, raw: dict, results: dict) -> list[dict]:
    """The points still to run: every budget below 16x first, then the widths, then the
    rest, longest first within a group so that side-by-side jobs finish together."""
    todo = []
    for factor in sorted(args.budgets):
        for name in args.models:
            key = f"{name}@{factor:g}x"
            if key in results["budgets"]:
                continue
            steps = max(1, round(raw["train"][name]["max_steps"] * factor))
            todo.append(
                {
                    "group": "budgets",
                    "key": key,
                    "model": name,
                    "steps": steps,
                    "raw": raw,
                    "extra": {"budget": factor},
                    "order": (factor > 4, 0),
                }
            )
    reference = raw["train"]["forcenet"]["max_steps"] * results["timing"]["widths"].get(
        f"h{raw['model']['hidden']}", 0.0
    )
    for width in args.widths:
        key = f"h{width}"
        if key in results["widths"]:
            continue
        steps = max(1, round(reference / results["timing"]["widths"][key]))
        todo.append(
            {
                "group": "widths",
                "key": key,
                "model": "forcenet",
                "steps": steps,
                "raw": _with_width(raw, width),
                "extra": {"width": width},
                "order": (False, 1),
            }
        )
    todo.sort(key=lambda j: j["order"])
    for job in todo:
        job.update(data=str(args.data), work=str(args.work / job["key"]), threads=args.threads)
        del job["order"]
    return todo


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT / "data",
        help="the default run's data/ (lmdb/ and graphs/)",
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--jobs", type=int, default=1, help="points trained side by side")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per job (default: 2 with one job, else 1)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/forcenet_accuracy"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/accuracy.json")
    parser.add_argument(
        "--plot", type=Path, default=ROOT / "reports/benchmarks/accuracy_vs_compute.png"
    )
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log the points to MLflow (experiment 'benchmarks', the repo's store)",
    )
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 2 if args.jobs == 1 else 1
    raw = yaml.safe_load(args.params.read_text())
    params_from_mapping(raw)  # checked before anything runs
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("budgets", {})
    results.setdefault("widths", {})
    timing = results.setdefault("timing", {})
    if not args.plot_only:
        timing["models"] = _model_timing(raw)
        timing.setdefault("widths", {})
        missing = [
            w for w in {*args.widths, raw["model"]["hidden"]} if f"h{w}" not in timing["widths"]
        ]
        if missing and args.widths:
            timing["widths"].update(_width_timing(raw, sorted(missing), args.data, threads=2))
        timing["note"] = (
            "seconds per step on 2 threads, timed alone: models from "
            "calibration.json, widths by this benchmark"
        )
        _with_compute(results)
        _save(results, args.out)
        todo = _jobs(args, raw, results)
        print(
            f"bench_accuracy: {len(todo)} points, {args.jobs} at a time, "
            f"{args.threads} thread(s) each: {[j['key'] for j in todo]}",
            flush=True,
        )
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, job): job["key"] for job in todo}
            for fut in as_completed(futures):
                group, key, point = fut.result()
                results[group][key] = point
                _with_compute(results)
                _save(results, args.out)
                print(f"bench_accuracy: {key} done: {json.dumps(point)}", flush=True)
                plot(results, args.plot)
    _with_compute(results)
    results["zero_baseline"] = _zero_baseline()
    _save(results, args.out)
    plot(results, args.plot)
    if not args.no_mlflow:
        print(f"bench_accuracy: {log_to_mlflow(results, args.plot)} points logged to MLflow")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
