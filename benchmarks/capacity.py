"""Capacity plan for OC20 at 200K / 2M / 20M / All, computed from the measured costs.

Reads the scale rehearsal (``reports/benchmarks/scale.json``, from
``benchmarks/bench_scale.py``) and writes ``reports/capacity.md``: disk, CPU core-hours
of preprocess and neighbors, loader workers, and GPU hours per epoch. Everything per
frame (bytes, seconds) is measured on this machine at the rehearsal's largest size and
scaled linearly by the number of frames; the per-GPU training throughput is *stated*
(``--gpu-graphs-per-s``, no GPU was measured) and can be replaced by a measured one.

    .venv/bin/python benchmarks/capacity.py [--gpu-graphs-per-s 400 1600]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from forcenet.atomic import write_text

#: OC20 S2EF training sets (frames).
SIZES = {"200K": 200_000, "2M": 2_000_000, "20M": 20_000_000, "All": 133_934_018}


def _fmt(value: float, unit: str = "") -> str:
    if value >= 100:
        text = f"{value:,.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text}{unit}"


def _ratios(ratios: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items())


def plan(scale: dict, gpu_rates: list[float]) -> str:
    runs = scale["runs"]
    big = runs[max(runs, key=int)]
    steps, disk = big["steps"], big["disk"]
    processes = scale["settings"]["processes_per_step"]
    # core-seconds per frame: wall time x processes (each process one core) / frames
    core_s = {
        name: steps[name]["seconds"] * processes / big["frames"]
        for name in ("acquire", "preprocess", "neighbors")
    }
    loader_rate = steps["epoch"]["graphs_per_s"]  # with 2 workers on 2 cores
    per_frame_bytes = {
        "raw (.extxyz.xz)": disk["raw_bytes_per_frame"],
        "frames (LMDB)": disk["frame_store_bytes_per_frame"],
        "graphs (LMDB)": disk["graph_store_bytes_per_frame"],
    }
    lines = [
        "# Capacity plan: OC20 at full size",
        "",
        "Computed by `benchmarks/capacity.py` from the scale rehearsal",
        f"(`reports/benchmarks/scale.json`: {big['frames']:,} OC20-sized synthetic frames,",
        f"{big['mean_atoms']} atoms and {big['edges_per_frame']:,} edges per frame on average,",
        "6 Å cutoff, 50 neighbors, 2 CPU cores). **Measured**: the per-frame disk and CPU",
        "costs below, at that size. **Projected**: every larger size, scaled linearly by the",
        "number of frames (the rehearsal's peak memory did not grow with the frames,",
        f"peak RSS ratios {_ratios(scale['peak_rss_ratio_big_to_small'])} from a tenth of",
        "the size), and all GPU",
        "hours, which use a *stated* training throughput per GPU, not a measured one.",
        "The synthetic raw files compress better than real OC20 ones (tiled copies): take",
        "the raw column as a lower bound.",
        "",
        "Measured per frame:",
        "",
        "| cost | per frame |",
        "|---|---|",
    ]
    for name, value in per_frame_bytes.items():
        lines.append(f"| disk, {name} | {_fmt(value)} B |")
    lines.append(f"| disk, graphs per edge | {disk['graph_store_bytes_per_edge']} B |")
    for name in ("preprocess", "neighbors"):
        lines.append(f"| CPU, {name} | {_fmt(core_s[name] * 1e3)} core-ms |")
    lines += [
        f"| data loader, 2 workers on 2 cores | {_fmt(loader_rate)} structures/s |",
        "",
        "| training set | frames | disk: raw + frames + graphs | preprocess | neighbors "
        "| loader cores for one epoch in 1 h | "
        + " | ".join(f"GPU-hours per epoch at {r:,.0f}/s" for r in gpu_rates)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(gpu_rates),
    ]
    for name, frames in SIZES.items():
        total_gb = sum(per_frame_bytes.values()) * frames / 1e9
        graphs_gb = per_frame_bytes["graphs (LMDB)"] * frames / 1e9
        cells = [
            name,
            f"{frames:,}",
            f"{_fmt(total_gb)} GB (graphs {_fmt(graphs_gb)} GB)",
            f"{_fmt(core_s['preprocess'] * frames / 3600)} core-h",
            f"{_fmt(core_s['neighbors'] * frames / 3600)} core-h",
            _fmt(frames / 3600 / (loader_rate / 2)),
        ]
        cells += [_fmt(frames / rate / 3600) for rate in gpu_rates]
        lines.append("| " + " | ".join(cells) + " |")
    data_json = Path("reports/benchmarks/data.json")
    if data_json.is_file():
        old = json.loads(data_json.read_text())["oc20"]["store"]["graph_bytes_per_edge_schema_1"]
        tb = old * big["edges_per_frame"] * SIZES["All"] / 1e12
        lines += [
            "",
            f"For comparison, the same graphs in graph schema 1 take {old} B per edge on disk",
            f"(`reports/benchmarks/data.json`): {tb:.1f} TB for All.",
        ]
    lines += [
        "",
        "With on-the-fly graphs (`graph.on_the_fly: true`) the graph store and the neighbors",
        "stage drop out: the graphs are built on the GPU per batch instead.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=Path, default=Path("reports/benchmarks/scale.json"))
    parser.add_argument("--out", type=Path, default=Path("reports/capacity.md"))
    parser.add_argument(
        "--gpu-graphs-per-s",
        type=float,
        nargs="+",
        default=[400.0, 1600.0],
        help="stated training throughputs per GPU (structures/s) for the GPU-hours columns",
    )
    args = parser.parse_args()
    text = plan(json.loads(args.scale.read_text()), args.gpu_graphs_per_s)
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
