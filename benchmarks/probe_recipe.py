"""Recipe probes on the dev slice of the training systems (never a validation split).

Trains one model from ``params.yaml`` with overrides for a fixed number of optimizer
steps, evaluates the dev slice every ``--eval-every`` steps, and appends one JSON line per
probe to ``--out``: the dev force MAE overall, on surface (tag 1) and adsorbate (tag 2)
atoms, each with its zero-force baseline. Budgets are in steps, so a probe's result does
not depend on the machine's load.

    python benchmarks/probe_recipe.py forcenet --steps 1200 --name base \\
        --set model.forcenet.basis=sphallm40 --out reports/probes/recipe.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the pipeline package

from forcenet.config import load_yaml
from forcenet.train import fit
from pipeline.params import MODEL_NAMES, params_from_mapping
from pipeline.train import model_kwargs, train_config


def _apply(params: dict, dotted: str) -> None:
    key, _, raw = dotted.partition("=")
    node = params
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", choices=MODEL_NAMES)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--frames", type=Path, default=Path("data/lmdb/train"))
    ap.add_argument("--graphs", type=Path, default=Path("data/graphs/train"))
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps of the probe")
    ap.add_argument("--eval-every", type=int, default=300, help="dev evaluation interval")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key, e.g. model.hidden=128",
    )
    ap.add_argument("--name", required=True, help="the probe's name in the output")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("reports/probes/recipe.jsonl"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    params = copy.deepcopy(load_yaml(args.params))
    for item in args.set:
        _apply(params, item)
    name = args.model
    params["train"][name]["max_steps"] = args.steps
    params["train"][name]["eval_every"] = args.eval_every
    params["train"]["time_budget_s"] = 0
    typed = params_from_mapping(params)
    cfg = train_config(typed, name)
    kwargs = model_kwargs(typed, name)
    evals: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fit(
            cfg,
            name,
            kwargs,
            train_dir=args.frames,
            graphs_dir=args.graphs,
            out_dir=Path(tmp),
            on_epoch_end=lambda step, m: evals.append({"step": step, **m}),
        )
    rows = []
    for m in evals:
        row = {"step": m["step"], "elapsed_s": round(m["elapsed_s"], 1)}
        for part in ("", "_surface", "_adsorbate"):
            if f"forces_mae{part}" in m:
                row[f"dev{part}"] = round(m[f"forces_mae{part}"], 4)
                row[f"rel{part}"] = round(m[f"forces_mae{part}"] / m[f"zero_forces_mae{part}"], 3)
        rows.append(row)
    record = {
        "name": args.name,
        "model": name,
        "steps": args.steps,
        "overrides": args.set,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t0, 1),
        "evals": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    last = rows[-1]
    print(
        f"{args.name}: step {last['step']} rel {last.get('rel')} surface "
        f"{last.get('rel_surface')} adsorbate {last.get('rel_adsorbate')}"
    )


if __name__ == "__main__":
    main()
