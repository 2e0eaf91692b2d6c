"""What each variable of the AVX2 CPU pin costs and changes -> reports/benchmarks/cpu_pin.json.

Side by side, each in a fresh process (the variables act when a library loads): the
default, each variable of ``python -m pipeline.cpu_pin avx2`` alone, numpy + OpenBLAS
(what decides the generated data), and the whole pin. Two workloads:

* ``emt``: the embedded EMT generator (``generate_emt``, in-process, one BFGS/MD system
  after another) on ``--systems`` training systems: numpy and OpenBLAS;
* ``train``: training steps of the params.yaml models (forward, loss, backward, AdamW) on
  one batch of 16 EMT slabs: torch (ATen, MKL, oneDNN).

Each run reports its CPU seconds (less sensitive than wall time to other jobs on a shared
machine) and a SHA-256 of its result (the generated files; the trained weights), which
shows whether the variable changes the bits on this machine. Settings run in interleaved
rounds; the minimum over rounds is kept.

    .venv/bin/python benchmarks/bench_cpu_pin.py                  # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_cpu_pin.py --rounds 5 --systems 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cpu_pin import PIN_VARIABLES, pin_env  # noqa: E402

TRAIN_MODELS = ("forcenet", "gns")
TRAIN_WARMUP, TRAIN_STEPS = 2, 6


def settings() -> dict[str, dict[str, str]]:
    """Setting name -> the variables it adds to the environment."""
    pin = pin_env("avx2")
    return {
        "default": {},
        "numpy": {"NPY_DISABLE_CPU_FEATURES": pin["NPY_DISABLE_CPU_FEATURES"]},
        "openblas": {"OPENBLAS_CORETYPE": pin["OPENBLAS_CORETYPE"]},
        "numpy+openblas": {k: pin[k] for k in ("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")},
        "aten": {"ATEN_CPU_CAPABILITY": pin["ATEN_CPU_CAPABILITY"]},
        "mkl": {"MKL_CBWR": pin["MKL_CBWR"]},
        "onednn": {"ONEDNN_MAX_CPU_ISA": pin["ONEDNN_MAX_CPU_ISA"]},
        "avx2 (all)": pin,
    }


#: Which workloads a setting can change (torch is not imported by the generator; the
#: training step does not go through numpy or OpenBLAS).
WORKLOADS = {
    "emt": ("default", "numpy", "openblas", "numpy+openblas", "avx2 (all)"),
    "train": ("default", "aten", "mkl", "onednn", "avx2 (all)"),
}


def _sha_tree(root: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


def work_emt(systems: int) -> dict:
    """Generate ``systems`` training systems in this process."""
    from forcenet.emt.generate import generate_emt

    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = time.process_time(), time.perf_counter()
        generate_emt(Path(tmp) / "raw", seed=0, n_systems={"train": systems}, workers=1)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        return {"cpu_s": cpu, "wall_s": wall, "sha256": _sha_tree(Path(tmp) / "raw")}


def work_train() -> dict:
    """CPU seconds per training step of each params.yaml model; SHA-256 of the weights."""
    import torch
    from bench_models import synthetic_samples, train_step

    from forcenet.data.batch import collate
    from forcenet.models import build_model
    from pipeline.params import load_params
    from pipeline.train import model_kwargs

    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    batch = collate(synthetic_samples(16, seed=0))
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name in TRAIN_MODELS:
        torch.manual_seed(0)
        model = build_model(name, model_kwargs(params, name)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(TRAIN_WARMUP):
            train_step(model, opt, batch, None, "cpu")
        c0 = time.process_time()
        for _ in range(TRAIN_STEPS):
            train_step(model, opt, batch, None, "cpu")
        digest = hashlib.sha256()
        for value in model.state_dict().values():
            digest.update(value.detach().contiguous().numpy().tobytes())
        out[name] = {
            "cpu_s_per_step": (time.process_time() - c0) / TRAIN_STEPS,
            "sha256": digest.hexdigest(),
        }
    return out


def run_setting(workload: str, extra: dict[str, str], systems: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARIABLES}
    env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env |= extra
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])
    cmd = [sys.executable, __file__, "--child", workload, "--systems", str(systems)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{workload} with {extra}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per workload and setting: the minimum CPU time, its cost against the default, and
    whether the result's bits equal the default's."""
    table: dict = {}
    emt = runs["emt"]
    base = min(r["cpu_s"] for r in emt["default"])
    table["emt"] = {
        name: {
            "cpu_s_min": round(min(r["cpu_s"] for r in rs), 3),
            "cpu_s_all": [round(r["cpu_s"], 3) for r in rs],
            "cost_pct": round(100 * (min(r["cpu_s"] for r in rs) / base - 1), 1),
            "sha256": rs[0]["sha256"],
            "same_bits_as_default": rs[0]["sha256"] == emt["default"][0]["sha256"],
            "reproducible_across_rounds": len({r["sha256"] for r in rs}) == 1,
        }
        for name, rs in emt.items()
    }
    train = runs["train"]
    table["train"] = {}
    for name, rs in train.items():
        row: dict = {"capability": rs[0]["capability"]}
        for model in TRAIN_MODELS:
            best = min(r[model]["cpu_s_per_step"] for r in rs)
            ref = min(r[model]["cpu_s_per_step"] for r in train["default"])
            row[model] = {
                "cpu_s_per_step_min": round(best, 4),
                "cost_pct": round(100 * (best / ref - 1), 1),
                "same_bits_as_default": rs[0][model]["sha256"]
                == train["default"][0][model]["sha256"],
            }
        table["train"][name] = row
    return table


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--systems", type=int, default=12, help="EMT training systems per run")
    p.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/cpu_pin.json")
    p.add_argument("--child", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = work_emt(args.systems) if args.child == "emt" else work_train()
        print(json.dumps(result))
        return
    all_settings = settings()
    runs: dict[str, dict[str, list[dict]]] = {w: {} for w in WORKLOADS}
    for rnd in range(args.rounds):
        for workload, names in WORKLOADS.items():
            for name in names:
                result = run_setting(workload, all_settings[name], args.systems)
                runs[workload].setdefault(name, []).append(result)
                print(f"round {rnd + 1} {workload:5s} {name:15s} {json.dumps(result)[:140]}")
    import numpy
    import torch

    report = {
        "what": "CPU cost and result bits of each variable of the AVX2 CPU pin, one thread",
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "torch": torch.__version__,
        },
        "settings": all_settings,
        "emt_systems": args.systems,
        "train_models": list(TRAIN_MODELS),
        "train_steps": TRAIN_STEPS,
        "rounds": args.rounds,
        "results": summarise(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
