"""Stage ``acquire``: raw frames from the source that ``data.source`` names.

``emt`` generates the embedded OC20-like dataset (and the validation systems relaxed
against the oracle), ``oc20`` downloads the official S2EF archives, ``files`` converts
your own ASE-readable files. Output: ``OUT/<split>/<k>.extxyz.xz`` + ``<k>.txt.xz``.

    python -m pipeline.acquire --out data/raw --is2rs-out data/is2rs
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import stage
from pipeline.params import DataConfig, load_params


def generate(cfg: DataConfig, out: Path, is2rs_out: Path) -> dict[str, Any]:
    """The embedded EMT dataset, sized by ``data.emt``."""
    from forcenet.emt.generate import generate_emt

    e = cfg.emt
    return generate_emt(
        out,
        seed=e.seed,
        n_systems=e.n_systems,
        frames_per_system=e.frames_per_system,
        md_frames_per_system=e.md_frames_per_system,
        relax_steps=e.relax_steps,
        md_temperature_K=e.md_temperature_K,
        max_force=e.max_force,
        workers=e.workers,
        shard_size=e.shard_size,
        is2rs_dir=is2rs_out,
        is2rs_systems=e.is2rs_systems,
        is2rs_fmax=e.is2rs_fmax,
    )


def acquire(cfg: DataConfig, out: Path, is2rs_out: Path) -> dict[str, Any]:
    """Generate, download or ingest into ``out/<split>/``; ``is2rs_out`` always exists after."""
    if cfg.source == "emt":
        return generate(cfg, out, is2rs_out)
    # Only the embedded data has an oracle to relax against; leave an empty folder so
    # the DVC output exists and the relax stage reports that nothing was relaxed.
    shutil.rmtree(is2rs_out, ignore_errors=True)
    Path(is2rs_out).mkdir(parents=True)
    if cfg.source == "oc20":
        from forcenet.data.download import download_splits

        o = cfg.oc20
        return download_splits(out, base_url=o.base_url, train=o.train, val=o.val)
    from forcenet.data.ingest import ingest_files

    f = cfg.files
    splits = {name: [Path(p) for p in files] for name, files in f.splits.items()}
    return ingest_files(splits, out, shard_size=f.shard_size, reference_energy=f.reference_energy)


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="raw output root")
    p.add_argument("--is2rs-out", type=Path, required=True, help="validation relaxation systems")
    args = p.parse_args(argv)
    params = load_params(args.params)
    stage.echo_json(acquire(params.data, args.out, args.is2rs_out))


if __name__ == "__main__":
    stage.run(main)
