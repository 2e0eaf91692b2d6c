"""Data efficiency: force MAE against the number of training systems, and on an element
that training never saw -> reports/benchmarks/data_efficiency.json.

Each point trains a model with the ``params.yaml`` recipe on the first ``N`` training
systems of the default run's stores (``data/lmdb``, ``data/graphs``; systems ordered by a
hash of their ``sid``, so a smaller set is part of every larger one) at a fixed compute
*per frame seen*: the default run's step budget times the share of the training frames
kept, so every size gets the same number of epochs. The dev slice is carved out of the
kept systems as in the pipeline; the score is val_id's force MAE (overall and adsorbate).

**Unseen element**: the same recipe trained on the training systems whose slabs hold no
atom of ``--unseen`` (Au by default; every metal of the embedded data appears in training
otherwise), scored on the validation structures (all four splits) that do hold it, next
to the zero-force baseline on those structures: a model that has never seen the element
should not do worse than predicting zero.

A power law MAE = a N^-b is fitted per model on the sizes, and where two models' fitted
curves cross is extrapolated (with the caveat the JSON states: a fit over one decade of
data from one generator).

    .venv/bin/python benchmarks/bench_data_efficiency.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet.atomic import write_text  # noqa: E402
from forcenet.data import keys as K  # noqa: E402
from pipeline.params import params_from_mapping  # noqa: E402

OUT = ROOT / "reports/benchmarks/data_efficiency.json"
SIZES = (25, 50, 100, 300)

#: Model variants: key -> (model, train overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "forcenet": ("forcenet", {}),
    "forcenet_fa_stochastic": ("forcenet", {"frame_averaging": "stochastic"}),
    "schnet": ("schnet", {}),
}


def _rank(sid: int) -> str:
    return hashlib.blake2b(str(sid).encode(), digest_size=8).hexdigest()


def _train_and_score(raw, variant, train_idx, full, val_sets, work: Path) -> dict[str, Any]:
    import shutil

    from torch.utils.data import DataLoader, Subset

    from forcenet.data.batch import collate
    from forcenet.train import evaluate, fit_datasets
    from forcenet.train.data import dev_split
    from pipeline.train import model_kwargs, train_config

    name, overrides = VARIANTS[variant]
    mine = copy.deepcopy(raw)
    default_steps = int(mine["train"][name]["max_steps"])
    steps = max(1, round(default_steps * len(train_idx) / len(full)))
    mine["train"][name].update(overrides, max_steps=steps)
    params = params_from_mapping(mine)
    cfg = train_config(params, name)
    sids = [int(full[i][K.SID]) for i in train_idx]
    tr, dv = dev_split(sids, cfg.dev_fraction, cfg.seed)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    best = fit_datasets(
        cfg,
        name,
        model_kwargs(params, name),
        train_set=Subset(full, [train_idx[i] for i in tr]),
        dev_set=Subset(full, [train_idx[i] for i in dv]),
        out_dir=work,
        graph=full.graph_settings,
    )
    seconds = time.perf_counter() - start
    from forcenet.checkpoint import load_model

    model, _ = load_model(best)
    scores: dict[str, Any] = {"variant": variant, "model": name, "steps": steps}
    scores["seconds"] = round(seconds, 1)
    for split, dataset in val_sets.items():
        m = evaluate(model, DataLoader(dataset, batch_size=32, collate_fn=collate), device="cpu")
        scores[split] = {
            k: m[k]
            for k in ("forces_mae", "forces_mae_adsorbate", "zero_forces_mae", "num_structures")
            if k in m
        }
    return scores


def power_law(sizes: list[int], maes: list[float]) -> dict[str, float]:
    """MAE = a N^-b fitted by least squares in log-log."""
    b, log_a = np.polyfit(np.log(sizes), np.log(maes), 1)
    return {"a": float(math.exp(log_a)), "b": float(-b)}


def crossing(one: dict[str, float], other: dict[str, float]) -> float | None:
    """The N where two fitted power laws meet (None when parallel)."""
    if abs(one["b"] - other["b"]) < 1e-9:
        return None
    return float((one["a"] / other["a"]) ** (1.0 / (one["b"] - other["b"])))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--data", type=Path, default=ROOT / "data")
    p.add_argument("--work", type=Path, default=ROOT / "data/bench_data_efficiency")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--unseen", default="Au", help="element left out of training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--options",
        type=Path,
        default=ROOT / "reports/benchmarks/forcenet_options.json",
        help="bench_options.py's JSON: its runs are the full-size points (same recipe, data "
        "and dev slice), so they are not trained again",
    )
    args = p.parse_args(argv)

    import torch
    from ase.data import atomic_numbers
    from torch.utils.data import Subset

    from forcenet.data.dataset import FrameDataset
    from forcenet.runtime import tune_malloc

    torch.set_num_threads(args.threads)
    tune_malloc()
    raw = yaml.safe_load(args.params.read_text())
    lmdb, graphs = args.data / "lmdb", args.data / "graphs"
    full = FrameDataset(lmdb / K.TRAIN, graphs / K.TRAIN)
    sids = [int(full[i][K.SID]) for i in range(len(full))]
    systems = sorted(set(sids), key=_rank)
    z = atomic_numbers[args.unseen]
    has_unseen = {s for i, s in enumerate(sids) if z in set(full[i][K.ATOMIC_NUMBERS].tolist())}
    val_id = FrameDataset(lmdb / "val_id", graphs / "val_id")
    held: list = []
    for split in K.VAL_SPLITS:
        ds = FrameDataset(lmdb / split, graphs / split)
        keep = [i for i in range(len(ds)) if z in set(ds[i][K.ATOMIC_NUMBERS].tolist())]
        held.append(Subset(ds, keep))
    unseen_val = torch.utils.data.ConcatDataset(held)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    options = {}
    if args.options.is_file():
        options = {e["key"]: e for e in json.loads(args.options.read_text())["entries"]}
    points = result.setdefault("points", {})
    for size in sorted(args.sizes):
        kept = set(systems[:size])
        idx = [i for i, s in enumerate(sids) if s in kept]
        for variant in args.variants:
            key = f"{variant}@{size}"
            if key in points:
                continue
            if len(idx) == len(full) and variant in options:
                entry = options[variant]
                points[key] = {
                    "systems": size,
                    "frames": len(idx),
                    "variant": variant,
                    "model": entry["model"],
                    "steps": entry["steps"],
                    "from": "forcenet_options.json",
                    "val_id": {
                        "forces_mae": entry["val_id_forces_mae"],
                        "forces_mae_adsorbate": entry["val_id_forces_mae_adsorbate"],
                    },
                }
                continue
            print(f"data efficiency: {key} ({len(idx)} frames)", flush=True)
            points[key] = {"systems": size, "frames": len(idx)} | _train_and_score(
                raw, variant, idx, full, {"val_id": val_id}, args.work / key
            )
            write_text(args.out, json.dumps(result, indent=1) + "\n")
    without = [i for i, s in enumerate(sids) if s not in has_unseen]
    unseen = result.setdefault("unseen_element", {"element": args.unseen})
    for variant in args.variants:
        if variant in unseen:
            continue
        print(f"data efficiency: {variant} without {args.unseen} ({len(without)} frames)")
        unseen[variant] = {
            "systems": len(set(sids) - has_unseen),
            "frames": len(without),
        } | _train_and_score(
            raw,
            variant,
            without,
            full,
            {"unseen": unseen_val},
            args.work / f"no{args.unseen}_{variant}",
        )
        write_text(args.out, json.dumps(result, indent=1) + "\n")
    fits = {}
    for variant in args.variants:
        pts = sorted(
            (v["systems"], v["val_id"]["forces_mae"])
            for v in points.values()
            if v["variant"] == variant
        )
        if len(pts) >= 2:
            fits[variant] = power_law([n for n, _ in pts], [m for _, m in pts])
    result["fits"] = fits
    result["crossings"] = {
        f"{a} vs {b}": crossing(fits[a], fits[b]) for a in fits for b in fits if a < b
    }
    result["caveat"] = (
        "power laws fitted over 25-300 systems of one EMT generator at one recipe; a crossing "
        "outside that range is an extrapolation over the fit's own range, not a measurement"
    )
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({"fits": fits, "crossings": result["crossings"]}, indent=1))


if __name__ == "__main__":
    main()
