"""Training-step throughput and peak memory of every model -> reports/benchmarks/models.json.

One step = forward, loss on forces (plus energy for energy models), backward, AdamW step, on a
batch of 16 OC20-like slabs (~30 atoms, cutoff 6 Å, at most 50 neighbors). Each (model,
config) runs in its own subprocess so its peak memory is its own: on CPU the growth of the
peak resident set (``ru_maxrss``) over the RSS before the model is built, on CUDA
``torch.cuda.max_memory_allocated``. The median of the timed repeats (after warm-up) is kept.

    .venv/bin/python benchmarks/bench_models.py                       # CPU, 2 threads
    .venv/bin/python benchmarks/bench_models.py --device cuda --amp bf16
    .venv/bin/python benchmarks/bench_models.py --frames data/lmdb/train --graphs data/graphs/train

Two configs per model: ``cpu`` (small widths, the sizes the reference timings were taken
at) and ``paper`` (the published sizes). Reference train-step throughputs of a
straightforward implementation (batch 16, ~25-atom slabs, 2 threads) are printed next to
ours with the factor we aim for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forcenet.data import keys as K  # noqa: E402
from forcenet.data.batch import Batch, batch_to, collate  # noqa: E402
from forcenet.models import MODELS, build_model  # noqa: E402
from forcenet.runtime import tune_malloc  # noqa: E402

CUTOFF, MAX_NEIGHBORS, BATCH_SIZE = 6.0, 50, 16

CONFIGS: dict[str, dict[str, dict]] = {
    "cpu": {
        "forcenet": {"hidden_channels": 128, "decoder_hidden_channels": 128, "num_interactions": 5},
        "schnet": {"hidden_channels": 128, "num_filters": 128, "num_interactions": 3},
        "dimenetpp": {"hidden_channels": 128, "out_emb_channels": 128, "num_blocks": 3},
        "gns": {"hidden_channels": 128, "num_interactions": 5},
    },
    "paper": {
        "forcenet": {},
        "schnet": {"hidden_channels": 1024, "num_filters": 256, "num_interactions": 3},
        "dimenetpp": {"hidden_channels": 192, "out_emb_channels": 192, "num_blocks": 3},
        "gns": {"hidden_channels": 128, "num_interactions": 10},
    },
}
#: (config, model) -> (reference graphs/s of a straightforward implementation, factor aimed for)
TARGETS: dict[tuple[str, str], tuple[float, float]] = {
    ("paper", "forcenet"): (3.2, 2.0),
    ("cpu", "forcenet"): (32.0, 2.0),
    ("cpu", "schnet"): (66.0, 1.0),
    ("cpu", "dimenetpp"): (1.8, 1.0),
}
#: Atoms per slab of the reference timings (ours: ~28.6, see the JSON's "batch").
REF_ATOMS_PER_GRAPH = 25
REPEATS = {"cpu": 5, "paper": 3}  # the paper configs are slow on CPU


def synthetic_samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` rattled 3x3x3 fcc(111) slabs with an adsorbate, EMT-labelled, with graphs."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT

    from forcenet.data.frame import Frame
    from forcenet.data.neighbors import neighbor_list

    rng = np.random.default_rng(seed)
    adsorbates = {"O": [], "H": [], "N": [], "CO": [1.15], "NO": [1.17], "OH": [0.97]}
    samples = []
    for k in range(n):
        slab = fcc111(str(rng.choice(["Cu", "Pd", "Pt", "Ni", "Ag", "Au"])), (3, 3, 3), vacuum=10.0)
        n_slab = len(slab)
        name = str(rng.choice(list(adsorbates)))
        zs = [0.0, *adsorbates[name]]
        add_adsorbate(slab, Atoms(name, positions=[[0, 0, z] for z in zs]), 1.8, "fcc")
        slab.pbc = True
        slab.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
        z = slab.positions[:, 2]
        tags = np.full(len(slab), 2, dtype=np.int64)
        tags[:n_slab] = np.where(z[:n_slab] > z[:n_slab].max() - 0.5, 1, 0)
        slab.calc = EMT()
        frame = Frame(
            atomic_numbers=slab.numbers.astype(np.int64),
            pos=slab.positions.copy(),
            cell=np.asarray(slab.cell[:]),
            pbc=slab.pbc.copy(),
            tags=tags,
            fixed=tags == 0,
            forces=slab.get_forces(apply_constraint=False),
            total_energy=float(slab.get_potential_energy()),
            reference_energy=0.0,
            sid=k,
            fid=0,
        )
        ei, off = neighbor_list(frame.pos, frame.cell, frame.pbc, CUTOFF, MAX_NEIGHBORS)
        samples.append({**frame.to_record(), K.EDGE_INDEX: ei, K.CELL_OFFSETS: off})
    return samples


def lmdb_samples(frames: Path, graphs: Path, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` samples of an LMDB split (frame store + graph store)."""
    from forcenet.data.dataset import FrameDataset

    dataset = FrameDataset(frames, graphs)
    return [dataset[i] for i in range(min(n, len(dataset)))]


def train_step(model, opt, batch: Batch, amp: torch.dtype | None, device: str) -> float:
    """Forward, L1 loss (forces, + energy per atom for energy models), backward, AdamW."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(batch)
        loss = (out[K.OUT_FORCES].float() - batch[K.FORCES]).abs().mean()
        if K.OUT_ENERGY in out:
            err = (out[K.OUT_ENERGY].float() - batch[K.ENERGY]) / batch[K.NATOMS]
            loss = loss + err.abs().mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args: argparse.Namespace, name: str, config: str) -> dict:
    """Benchmark one (model, config) in this process; returns the result row."""
    malloc = tune_malloc() if args.device == "cpu" and args.tune_malloc else {}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.frames:
        samples = lmdb_samples(Path(args.frames), Path(args.graphs), BATCH_SIZE)
    else:
        samples = synthetic_samples(BATCH_SIZE, seed=0)
    batch = batch_to(collate(samples), args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    kwargs = CONFIGS[config].get(name, {})  # without a size of its own: the paper's defaults
    rss0 = _rss_bytes() if args.device == "cpu" else 0
    model = build_model(name, kwargs).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for step in range(args.warmup + REPEATS[config] * args.repeat_factor):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(model, opt, batch, amp, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    step_s = statistics.median(times)
    natoms = int(batch[K.NATOMS].sum())
    return {
        "model": name,
        "config": config,
        "kwargs": kwargs,
        "params": sum(p.numel() for p in model.parameters()),
        "malloc_tuning": malloc,
        "step_s_median": step_s,
        "step_s_all": times,
        # CPU seconds of this process per step (all threads): less sensitive than wall time
        # to other jobs on a shared machine; cpu_s / threads bounds the uncontended step time.
        "cpu_s_median": statistics.median(cpu_times),
        "graphs_per_s": BATCH_SIZE / step_s,
        "atoms_per_s": natoms / step_s,
        "peak_memory_mb": peak / 2**20,
        "memory_measure": "cuda max_memory_allocated"
        if args.device == "cuda"
        else "ru_maxrss growth over RSS before model build",
    }


def _target_note(row: dict, device: str) -> str:
    key = (row["config"], row["model"])
    if device != "cpu" or key not in TARGETS:
        return ""
    ref, factor = TARGETS[key]
    ok = row["graphs_per_s"] >= ref * factor
    # the reference slabs had ~25 atoms (same ~41 edges per atom); per atom is size-neutral
    ref_atoms = ref * factor * REF_ATOMS_PER_GRAPH
    ok_atoms = row["atoms_per_s"] >= ref_atoms
    return (
        f"ref {ref:g}/s, aim >= {factor:g}x -> {'OK' if ok else 'BELOW'}; per atom "
        f"{row['atoms_per_s']:.0f} vs {ref_atoms:.0f}/s -> {'OK' if ok_atoms else 'BELOW'}"
    )


def _batch_stats(args: argparse.Namespace) -> dict:
    if args.frames:
        samples = lmdb_samples(Path(args.frames), Path(args.graphs), BATCH_SIZE)
    else:
        samples = synthetic_samples(BATCH_SIZE, seed=0)
    natoms = [len(s[K.ATOMIC_NUMBERS]) for s in samples]
    edges = sum(s[K.EDGE_INDEX].shape[1] for s in samples)
    return {
        "source": f"lmdb {args.frames}"
        if args.frames
        else "synthetic EMT slabs (ase fcc111 3x3x3)",
        "batch_size": BATCH_SIZE,
        "atoms_per_graph_mean": float(np.mean(natoms)),
        "edges_per_atom_mean": edges / sum(natoms),
        "cutoff": CUTOFF,
        "max_neighbors": MAX_NEIGHBORS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--no-tune-malloc",
        dest="tune_malloc",
        action="store_false",
        help="leave glibc malloc at its defaults (default: forcenet.runtime.tune_malloc, as fit)",
    )
    parser.add_argument("--repeat-factor", type=int, default=1, help="multiply the repeats")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--configs", nargs="+", default=["cpu", "paper"], choices=list(CONFIGS))
    parser.add_argument("--frames", help="LMDB frame split dir (default: synthetic slabs)")
    parser.add_argument("--graphs", help="LMDB graph split dir matching --frames")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/models.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "model:config"
    args = parser.parse_args()
    if bool(args.frames) != bool(args.graphs):
        parser.error("--frames and --graphs go together")
    if args.one:
        name, config = args.one.split(":")
        print(json.dumps(run_one(args, name, config)))
        return
    rows = []
    for config in args.configs:
        for name in args.models:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{name}:{config}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{name}/{config} FAILED:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["target"] = _target_note(row, args.device)
            rows.append(row)
            print(
                f"{name:10s} {config:6s} {row['graphs_per_s']:8.2f} graphs/s "
                f"{row['atoms_per_s']:9.0f} atoms/s {row['peak_memory_mb']:8.0f} MB "
                f"{row['params'] / 1e6:6.2f} M params  cpu {row['cpu_s_median']:6.2f} s/step  "
                f"{row['target']}",
                flush=True,
            )
    report = {
        "device": args.device
        if args.device == "cpu"
        else f"cuda ({torch.cuda.get_device_name() if torch.cuda.is_available() else '?'})",
        "amp": args.amp,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "loadavg_1min": os.getloadavg()[0],
        "batch": _batch_stats(args),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
