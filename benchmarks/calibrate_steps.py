"""Step budgets that give every model the same training compute
-> reports/benchmarks/calibration.json.

Training is bounded by optimizer steps (params.yaml ``train.<model>.max_steps``) so that a
rerun reproduces the weights whatever else the machine is doing. To keep the comparison
fair at equal compute, this benchmark times each model's real training step (the
``params.yaml`` model and recipe: batch size, loss, rotation augmentation, the
normalisation) on the first batches of the training split, and converts a target number
of seconds on this (reference) machine into a step count per model:

    steps = round(target_s / median seconds per step, to a multiple of 10)

Run it alone on a quiet machine (two jobs at once halve each other's speed):

    .venv/bin/python benchmarks/calibrate_steps.py --target-s 150            # report only
    .venv/bin/python benchmarks/calibrate_steps.py --target-s 150 --write-params

``--write-params`` rewrites the ``max_steps:`` line of each ``train.<model>`` block of
params.yaml in place (comments kept), so ``dvc repro`` picks the counts up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet import checkpoint as C  # noqa: E402
from forcenet import train as T  # noqa: E402
from forcenet.config import load_yaml  # noqa: E402
from forcenet.data import keys as K  # noqa: E402
from forcenet.data.batch import collate  # noqa: E402
from forcenet.data.dataset import FrameDataset  # noqa: E402
from forcenet.geometry import random_rotations, rotate_batch  # noqa: E402
from forcenet.runtime import tune_malloc  # noqa: E402
from forcenet.scaling import label_stats, set_scales  # noqa: E402
from forcenet.train.config import make_loss  # noqa: E402
from pipeline.params import MODEL_NAMES, Params, load_params, params_from_mapping  # noqa: E402
from pipeline.train import model_kwargs, train_config  # noqa: E402

#: Timed steps per model after warm-up (DimeNet++ is ~20x slower per step).
TIMED = {"dimenetpp": 6}
DEFAULT_TIMED, WARMUP = 30, 3


def time_model(name: str, params: Params, dataset: FrameDataset, *, timed: int) -> dict:
    """Median seconds of one training step of model ``name`` as params.yaml configures it."""
    cfg = train_config(params, name)
    torch.manual_seed(cfg.seed)
    model = C.build_scaled_model(name, model_kwargs(params, name))
    samples = [dataset[i] for i in range(min(len(dataset), 512))]
    set_scales(model, label_stats(samples))
    loss_fn = make_loss(cfg, model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(samples), generator=gen).tolist()
    times, atoms = [], 0
    for k in range(WARMUP + timed):
        idx = [order[(k * cfg.batch_size + b) % len(order)] for b in range(cfg.batch_size)]
        batch = collate([samples[i] for i in idx])
        start = time.perf_counter()
        if cfg.rotation_augment:
            batch = rotate_batch(batch, random_rotations(cfg.batch_size, gen))
        T.train_step(model, batch, opt, loss_fn=loss_fn, clip_grad=cfg.clip_grad)
        if k >= WARMUP:
            times.append(time.perf_counter() - start)
            atoms += int(batch[K.NATOMS].sum())
    step_s = statistics.median(times)
    return {
        "seconds_per_step": step_s,
        "batch_size": cfg.batch_size,
        "atoms_per_graph": atoms / (timed * cfg.batch_size),
        "timed_steps": timed,
    }


def write_params(path: Path, steps: dict[str, int]) -> None:
    """Set ``train.<model>.max_steps`` in params.yaml, keeping its layout and comments."""
    lines = path.read_text().splitlines(keepends=True)
    section, model = None, None
    done = set()
    for k, line in enumerate(lines):
        top = re.match(r"^(\w+):", line)
        if top:
            section, model = top.group(1), None
            continue
        sub = re.match(r"^  (\w+):\s*(#.*)?$", line)
        if sub and section == "train":
            model = sub.group(1)
            continue
        m = re.match(r"^(    max_steps:\s*)(\d+)(.*)$", line.rstrip("\n"))
        if m and section == "train" and model in steps:
            lines[k] = f"{m.group(1)}{steps[model]}{m.group(3)}\n"
            done.add(model)
    missing = sorted(set(steps) - done)
    if missing:
        raise SystemExit(f"{path}: no train.<model>.max_steps line for {missing}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(lines))
    train_config(params_from_mapping(load_yaml(tmp)), next(iter(steps)))  # still valid
    os.replace(tmp, path)


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--frames", type=Path, default=ROOT / "data/lmdb/train")
    ap.add_argument("--graphs", type=Path, default=ROOT / "data/graphs/train")
    ap.add_argument(
        "--target-s",
        type=float,
        default=150.0,
        help="training seconds per model on this machine (default 150)",
    )
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-params", action="store_true", help="update params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/calibration.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tune_malloc()
    params = load_params(args.params)
    dataset = FrameDataset(args.frames, args.graphs)
    results, steps = {}, {}
    for name in args.models:
        r = time_model(name, params, dataset, timed=TIMED.get(name, DEFAULT_TIMED))
        steps[name] = max(10, int(round(args.target_s / r["seconds_per_step"] / 10.0)) * 10)
        r["max_steps"] = steps[name]
        results[name] = r
        print(
            f"{name:10s} {r['seconds_per_step'] * 1e3:8.1f} ms/step -> {steps[name]:6d} steps "
            f"for {args.target_s:.0f} s",
            flush=True,
        )
    out = {
        "target_s": args.target_s,
        "threads": args.threads,
        "machine": {
            "cpu": _cpu_model(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)
    if args.write_params:
        write_params(args.params, steps)
        print(f"wrote train.<model>.max_steps to {args.params}")


if __name__ == "__main__":
    main()
