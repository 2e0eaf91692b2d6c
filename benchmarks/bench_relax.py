"""Speed of ML relaxations: LBFGS steps per second on a ~100-atom slab, for every model.

Writes ``reports/benchmarks/relax.json`` (and prints it). The structure is a Cu(111)
5x5x4 slab with CO on top (102 atoms, bottom two layers fixed); the graph is the OC20 one
(cutoff 6 Å, 50 neighbors). Models are randomly initialised at their CPU-sized configs
(speed does not depend on the weights). Each step = neighbor list + collate + forward
(+ backward for gradient-force models) + one ASE LBFGS step, i.e. what
:func:`forcenet.relax.relax_structures` does. Reported per device and model:

* ``steps_per_s`` / ``ms_per_step``: one structure relaxed alone (``fmax`` 0: every step
  runs), after a short warm-up;
* ``graph_ms``: the neighbor list + collate part of one step (CPU, same on every device);
* on CUDA, also ``batched_structure_steps_per_s``: ``batch`` structures stepped together
  (one forward pass per step), the throughput of an IS2RS evaluation.

CPU runs with ``torch.set_num_threads(2)``. Usage:
``python benchmarks/bench_relax.py [--steps 3] [--gpu-steps 40] [--batch 16] [--out PATH]``.
Takes about 1-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.constraints import FixAtoms

from forcenet.calculator import ForceNetCalculator
from forcenet.checkpoint import build_scaled_model
from forcenet.data.frame import fixed_mask
from forcenet.relax import relax_structures

CUTOFF, MAX_NEIGHBORS = 6.0, 50
#: CPU-sized configs of each model (the benchmark sizes named in the issue).
CONFIGS: dict[str, dict] = {
    "forcenet": {
        "hidden_channels": 128,
        "decoder_hidden_channels": 128,
        "num_interactions": 5,
        "cutoff": CUTOFF,
    },
    "schnet": {"hidden_channels": 128, "num_filters": 128, "num_interactions": 3, "cutoff": CUTOFF},
    # Non-zero output layers: the reference init predicts F = 0, which never moves an atom.
    "dimenetpp": {
        "hidden_channels": 128,
        "out_emb_channels": 128,
        "num_blocks": 3,
        "cutoff": CUTOFF,
        "output_initializer": "glorot_orthogonal",
    },
    "gns": {"hidden_channels": 128, "num_interactions": 5, "cutoff": CUTOFF},
}


def benchmark_slab() -> Atoms:
    """Cu(111) 5x5x4 + CO (102 atoms), OC20 tags, the two bottom layers fixed."""
    atoms = fcc111("Cu", size=(5, 5, 4), vacuum=8.0)
    layer = atoms.get_tags()  # 1 = top layer
    n_slab = len(atoms)
    add_adsorbate(atoms, molecule("CO"), 1.9, "ontop")
    tags = np.full(len(atoms), 2)
    tags[:n_slab] = np.where(layer == 1, 1, 0)
    atoms.set_tags(tags)
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(layer[:n_slab] >= 3)))
    atoms.rattle(0.03, seed=0)
    return atoms


def _calculator(name: str, device: str) -> ForceNetCalculator:
    torch.manual_seed(0)
    model = build_scaled_model(name, CONFIGS[name])
    return ForceNetCalculator(
        model=model, cutoff=CUTOFF, max_neighbors=MAX_NEIGHBORS, device=device
    )


def _relax_rate(calc: ForceNetCalculator, structures: list[Atoms], steps: int) -> float:
    """Structure-steps per second of ``steps`` LBFGS steps on ``structures`` (lock-step)."""
    with tempfile.TemporaryDirectory() as tmp:
        relax_structures(
            calc,
            structures,
            optimizer="lbfgs",
            fmax=0.0,
            steps=1,
            traj_dir=Path(tmp) / "warm",
            batch_size=len(structures),
        )
        if calc.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        table = relax_structures(
            calc,
            structures,
            optimizer="lbfgs",
            fmax=0.0,
            steps=steps,
            traj_dir=Path(tmp) / "run",
            batch_size=len(structures),
        )
        if calc.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    # Each step is one forward pass (the final state's extra pass is included in the time).
    return float(table["steps"].sum()) / seconds


def _graph_ms(calc: ForceNetCalculator, atoms: Atoms, repeats: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        calc.batch([atoms])
    return 1000 * (time.perf_counter() - start) / repeats


def bench_device(device: str, steps: int, batch: int) -> dict:
    atoms = benchmark_slab()
    out = {}
    for name in CONFIGS:
        calc = _calculator(name, device)
        rate = _relax_rate(calc, [atoms], steps)
        row = {
            "steps": steps,
            "steps_per_s": round(rate, 2),
            "ms_per_step": round(1000 / rate, 1),
            "graph_ms": round(_graph_ms(calc, atoms), 1),
            "params": sum(p.numel() for p in calc.model.parameters()),
        }
        if device == "cuda":
            row["batch"] = batch
            row["batched_structure_steps_per_s"] = round(
                _relax_rate(calc, [atoms.copy() for _ in range(batch)], steps), 1
            )
        out[name] = row
        print(device, name, row, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="LBFGS steps timed on CPU")
    parser.add_argument("--gpu-steps", type=int, default=40, help="LBFGS steps timed on CUDA")
    parser.add_argument("--batch", type=int, default=16, help="structures per batch on CUDA")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/relax.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    atoms = benchmark_slab()
    report = {
        "structure": {
            "natoms": len(atoms),
            "free": int((~fixed_mask(atoms)).sum()),
            "cutoff": CUTOFF,
            "max_neighbors": MAX_NEIGHBORS,
            "optimizer": "lbfgs (OCP settings)",
        },
        "configs": CONFIGS,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2),  # shared machines: contention
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "cpu": bench_device("cpu", args.steps, args.batch),
    }
    if torch.cuda.is_available():
        report["cuda"] = bench_device("cuda", args.gpu_steps, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
