"""Frame averaging: its cost per forward and how often frames are degenerate on the
embedded data -> reports/benchmarks/frames.json.

* **Cost**: ForceNet and GNS with the default run's settings (params.yaml) on batches of
  the default run's training split: the median seconds of a training forward + backward
  without frames, with one random frame per structure (``stochastic``, the training
  mode) and a forward over all 8 frames (evaluation, ``full``), timed side by side in one
  run (the settings interleaved, repeats after a warm-up).
* **Degenerate frames**: the share of structures of every split whose principal variances
  tie (a gap below :data:`forcenet.frames.DEGENERATE_GAP` of the largest), for which frame
  averaging is covariant only about the third axis.

    .venv/bin/python benchmarks/bench_frames.py        # after `dvc repro neighbors`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet.atomic import write_text  # noqa: E402
from forcenet.data import keys as K  # noqa: E402
from forcenet.data.batch import collate  # noqa: E402
from forcenet.data.dataset import FrameDataset  # noqa: E402
from forcenet.frames import DEGENERATE_GAP, pca_frames  # noqa: E402
from forcenet.scaling import ScaledModel  # noqa: E402
from pipeline.params import params_from_mapping  # noqa: E402
from pipeline.train import model_kwargs  # noqa: E402

SPLITS = ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")


def degenerate_share(frames_dir: Path) -> dict[str, float]:
    data = FrameDataset(frames_dir)
    flags = []
    for start in range(0, len(data), 256):
        batch = collate([data[i] for i in range(start, min(start + 256, len(data)))])
        flags.append(pca_frames(batch[K.POS], batch[K.BATCH], len(batch[K.NATOMS]))[1])
    flag = torch.cat(flags)
    return {"structures": int(flag.numel()), "degenerate": float(flag.double().mean())}


def timings(model_name: str, params, batches: list, repeats: int) -> dict[str, float]:
    from forcenet.models import build_model

    torch.manual_seed(0)
    kwargs = model_kwargs(params, model_name)
    models = {
        mode: ScaledModel(build_model(model_name, kwargs), frame_averaging=mode)
        for mode in ("none", "stochastic", "full")
    }
    for m in models.values():  # one set of weights for all three
        m.load_state_dict(models["none"].state_dict())

    def train_forward(model: ScaledModel, batch: dict) -> None:
        model.train()
        model(batch)[K.OUT_FORCES].square().sum().backward()

    def eval_forward(model: ScaledModel, batch: dict) -> None:
        model.eval()
        with torch.no_grad():
            model(batch)

    cases = {
        "train_none": (models["none"], train_forward),
        "train_stochastic": (models["stochastic"], train_forward),
        "eval_none": (models["none"], eval_forward),
        "eval_full": (models["full"], eval_forward),
    }
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(repeats + 1):  # the first round warms up
        for key, (model, run) in cases.items():
            start = time.perf_counter()
            for batch in batches:
                run(model, batch)
            if rep:
                seconds[key].append((time.perf_counter() - start) / len(batches))
    out = {f"{k}_s_per_batch": statistics.median(v) for k, v in seconds.items()}
    out["train_stochastic_over_none"] = (
        out["train_stochastic_s_per_batch"] / out["train_none_s_per_batch"]
    )
    out["eval_full_over_none"] = out["eval_full_s_per_batch"] / out["eval_none_s_per_batch"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--data", type=Path, default=ROOT / "data")
    p.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/frames.json")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(args.params.read_text())
    params = params_from_mapping(raw)
    train = FrameDataset(args.data / "lmdb" / "train", args.data / "graphs" / "train")
    size = int(raw["train"]["forcenet"]["batch_size"])
    batches = [collate([train[b * size + i] for i in range(size)]) for b in range(args.batches)]
    result = {
        "threads": args.threads,
        "batch_size": size,
        "degenerate_gap": DEGENERATE_GAP,
        "degenerate_frames": {s: degenerate_share(args.data / "lmdb" / s) for s in SPLITS},
        "cost": {m: timings(m, params, batches, args.repeats) for m in ("forcenet", "gns")},
        "date": time.strftime("%Y-%m-%d"),
    }
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
