"""ForceNet's training options at the default compute -> reports/benchmarks/forcenet_options.json.

Each option set trains ForceNet with the ``params.yaml`` settings plus its options on the
default run's stores (``data/lmdb``, ``data/graphs``; run ``make repro`` or ``dvc repro
neighbors`` first) for the default run's training compute, and records:

* ``dev_forces_mae`` and ``dev_forces_mae_adsorbate``: the dev slice of the training
  systems at the selected checkpoint -- the figures an option is chosen on;
* ``val_id_forces_mae`` and ``val_id_forces_mae_adsorbate``: the in-domain validation
  split, reported, never chosen on;
* ``rotation_covariance_error``: mean |F(x) R - F(x R)| on val_id (eV/Å);
* ``lambda``: the force Jacobian's asymmetry on the physics stage's first structures
  (0 = conservative);
* ``steps`` and ``seconds`` (wall clock of the training, for reference: the budget is
  the step count).

The compute is the default run's: ForceNet's ``train.forcenet.max_steps`` steps. An option
that makes a step dearer gets fewer: the conservative fine-tune's steps cost
:data:`CONSERVATIVE_STEP_COST` direct ones (a double backward), so its direct phase is
shortened to keep the total. The SchNet reference trains with its own default budget
(the same compute, by ``benchmarks/calibrate_steps.py``).

Entries already in the JSON are kept (``--redo KEY`` reruns one); ``--only KEY`` runs a
subset:

    .venv/bin/python benchmarks/bench_options.py
    .venv/bin/python benchmarks/bench_options.py --only forcenet_fa_stochastic
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet.atomic import write_text  # noqa: E402
from forcenet.data import keys as K  # noqa: E402
from pipeline.params import params_from_mapping  # noqa: E402

OUT = ROOT / "reports/benchmarks/forcenet_options.json"

#: Cost of one conservative (double-backward) ForceNet step in direct steps, measured
#: side by side on the default run's batches (reports/probes/conservative_finetune.md).
CONSERVATIVE_STEP_COST = 2.8

#: Conservative steps of the fine-tune option sets.
CONSERVATIVE_STEPS = 190


def option_sets(raw: dict) -> dict[str, dict[str, Any]]:
    """Key -> {model, options (as reported), train / model overrides}."""
    steps = int(raw["train"]["forcenet"]["max_steps"])

    def fine_tune(conservative: int, lr: float, energy_coef: float = 0.05) -> dict[str, Any]:
        """A fine-tune of ``conservative`` steps at the default run's total compute."""
        direct = steps - round(conservative * CONSERVATIVE_STEP_COST)
        return {
            "energy_coef": energy_coef,
            "conservative_finetune_steps": conservative,
            "max_steps": direct + conservative,
            "conservative_lr": lr,
            "conservative_warmup_steps": 10,
        }

    sets: dict[str, dict[str, Any]] = {
        "schnet": {"model": "schnet", "train": {}},
        "forcenet": {"model": "forcenet", "train": {}},
        "forcenet_fa_stochastic": {"model": "forcenet", "train": {"frame_averaging": "stochastic"}},
        "forcenet_fa_stochastic_no_rotation": {
            "model": "forcenet",
            "train": {"frame_averaging": "stochastic", "rotation_augment": False},
        },
        "forcenet_ema": {"model": "forcenet", "train": {"ema_decay": 0.999}},
        "forcenet_fa_stochastic_ema": {
            "model": "forcenet",
            "train": {"frame_averaging": "stochastic", "ema_decay": 0.999},
        },
        "forcenet_ema_099": {"model": "forcenet", "train": {"ema_decay": 0.99}},
        "forcenet_fa_stochastic_ema_099": {
            "model": "forcenet",
            "train": {"frame_averaging": "stochastic", "ema_decay": 0.99},
        },
        "forcenet_conservative": {
            "model": "forcenet",
            "train": fine_tune(CONSERVATIVE_STEPS, 5e-4),
            "model_overrides": {"energy_head": True},
        },
        "forcenet_conservative_lr1e-3": {
            "model": "forcenet",
            "train": fine_tune(CONSERVATIVE_STEPS, 1e-3),
            "model_overrides": {"energy_head": True},
        },
        "forcenet_conservative_380_lr1e-3": {
            "model": "forcenet",
            "train": fine_tune(2 * CONSERVATIVE_STEPS, 1e-3),
            "model_overrides": {"energy_head": True},
        },
    }
    for spec in sets.values():
        spec["options"] = {**spec["train"], **spec.get("model_overrides", {})}
    return sets


def run_set(raw: dict, key: str, spec: dict, data: Path, work: Path) -> dict[str, Any]:
    """Train one option set afresh and measure it (see the module docstring)."""
    from forcenet.checkpoint import load_checkpoint, load_model
    from forcenet.data.graphs import GraphSettings
    from forcenet.evaluate import evaluate_checkpoint
    from forcenet.physics.conservation import conservation_summary, conservation_table
    from forcenet.train import fit
    from pipeline.physics_inputs import physics_structures
    from pipeline.train import model_kwargs, train_config

    name = spec["model"]
    mine = copy.deepcopy(raw)
    mine["train"][name].update(spec["train"])
    mine["model"][name].update(spec.get("model_overrides", {}))
    params = params_from_mapping(mine)
    out = work / key
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    best = fit(
        train_config(params, name),
        name,
        model_kwargs(params, name),
        train_dir=data / "lmdb" / K.TRAIN,
        graphs_dir=data / "graphs" / K.TRAIN,
        out_dir=out,
    )
    seconds = time.perf_counter() - start
    ckpt = load_checkpoint(best)
    dev = ckpt["train_info"]["metrics"]
    table = evaluate_checkpoint(best, [data / "lmdb" / "val_id"], graphs=data / "graphs")
    values = {(r.split, r.metric): float(r.value) for r in table.itertuples(index=False)}
    model, _ = load_model(best)
    structures, names = physics_structures(
        data / "is2rs", params.physics.splits, params.physics.conservation.structures
    )
    lam = conservation_summary(
        conservation_table(
            model, structures, graph=GraphSettings.from_mapping(ckpt["graph"]), names=names
        )
    )["lambda_mean"]
    return {
        "key": key,
        "model": name,
        "options": spec["options"],
        "steps": int(load_checkpoint(out / "last.pt")["step"]),
        "seconds": round(seconds, 1),
        "dev_forces_mae": float(dev["forces_mae"]),
        "dev_forces_mae_adsorbate": float(dev.get("forces_mae_adsorbate", float("nan"))),
        "val_id_forces_mae": values[("val_id", "forces_mae")],
        "val_id_forces_mae_adsorbate": values.get(("val_id", "forces_mae_adsorbate"), float("nan")),
        "rotation_covariance_error": values.get(
            ("val_id", "rotation_covariance_mae"), float("nan")
        ),
        "lambda": lam,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="holds lmdb/, graphs/, is2rs/")
    p.add_argument("--work", type=Path, default=ROOT / "data/bench_options")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--only", nargs="+", help="option-set keys to run (default: all)")
    p.add_argument("--redo", nargs="+", default=[], help="rerun these even if present")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from forcenet.runtime import tune_malloc

    torch.set_num_threads(args.threads)
    tune_malloc()
    raw = yaml.safe_load(args.params.read_text())
    sets = option_sets(raw)
    unknown = sorted(set(args.only or []) - set(sets))
    if unknown:
        p.error(f"unknown option sets {unknown}; known: {sorted(sets)}")
    entries = json.loads(args.out.read_text())["entries"] if args.out.is_file() else []
    done = {e["key"] for e in entries} - set(args.redo)
    for key in args.only or list(sets):
        if key in done:
            continue
        print(f"bench_options: {key} {sets[key]['options']}", flush=True)
        entry = run_set(raw, key, sets[key], args.data, args.work)
        entries = [e for e in entries if e["key"] != key] + [entry]
        order = list(sets)
        entries.sort(key=lambda e: order.index(e["key"]) if e["key"] in order else len(order))
        document = {
            "machine": _machine(),
            "threads": args.threads,
            "compute": "the default run's: train.forcenet.max_steps direct ForceNet steps",
            "entries": entries,
        }
        write_text(args.out, json.dumps(document, indent=1) + "\n")
        print(f"bench_options: {json.dumps(entry)}", flush=True)


def _machine() -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
