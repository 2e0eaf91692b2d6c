"""OC20-sized synthetic frames for the data benchmarks, at no labelling cost.

Generated EMT frames (about 28 atoms) are tiled in the surface plane until they hold
60-90 atoms, OC20's range (mean about 73), then rattled: every copy gets its own small
random displacement, so no two frames are the same. The labels are the tiled labels of
the original frame. The periodic copy of an EMT structure has exactly those forces, so
a rattled copy's labels are no longer exact. That is fine for throughput, never for
accuracy. The benchmarks only time the data path with them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from forcenet.data.frame import Frame

#: OC20's adsorbate+slab size range (atoms per frame).
OC20_ATOMS = (60, 90)


def tiling(natoms: int, lo: int = OC20_ATOMS[0], hi: int = OC20_ATOMS[1]) -> tuple[int, int]:
    """In-plane repeats (a, b) that put ``natoms * a * b`` in [lo, hi], as square as
    possible; (1, 1) when none does (then the frame is left as it is)."""
    best: tuple[int, int] | None = None
    for a in range(1, 6):
        for b in range(a, 6):
            if lo <= natoms * a * b <= hi and (best is None or b - a < best[1] - best[0]):
                best = (a, b)
    return best or (1, 1)


def tile(frame: Frame, a: int, b: int) -> Frame:
    """``frame`` repeated a x b times along its first two lattice vectors (ASE order)."""
    shifts = np.array([i * frame.cell[0] + j * frame.cell[1] for i in range(a) for j in range(b)])
    copies = a * b
    return Frame(
        atomic_numbers=np.tile(frame.atomic_numbers, copies),
        pos=(frame.pos[None] + shifts[:, None]).reshape(-1, 3),
        cell=np.stack([frame.cell[0] * a, frame.cell[1] * b, frame.cell[2]]),
        pbc=frame.pbc.copy(),
        tags=np.tile(frame.tags, copies),
        fixed=np.tile(frame.fixed, copies),
        forces=np.tile(frame.forces, (copies, 1)),
        total_energy=frame.total_energy * copies,
        reference_energy=frame.reference_energy * copies,
        sid=frame.sid,
        fid=frame.fid,
    )


def oc20_sized(
    pool: Sequence[Frame], count: int, *, seed: int, rattle: float = 0.02, start: int = 0
) -> Iterator[Frame]:
    """``count`` OC20-sized frames: frame ``start + n`` is pool frame ``(start + n) %
    len(pool)`` tiled to 60-90 atoms and rattled by ``rattle`` Å (its own random stream:
    the same ``seed`` and index give the same frame, whichever process writes it)."""
    tiled = [tile(f, *tiling(len(f.atomic_numbers))) for f in pool]
    for n in range(start, start + count):
        base = tiled[n % len(tiled)]
        rng = np.random.default_rng((seed, n))
        moved = base.pos + rng.normal(0.0, rattle, base.pos.shape) * ~base.fixed[:, None]
        yield Frame(
            atomic_numbers=base.atomic_numbers,
            pos=moved,
            cell=base.cell,
            pbc=base.pbc,
            tags=base.tags,
            fixed=base.fixed,
            forces=base.forces,
            total_energy=base.total_energy,
            reference_energy=base.reference_energy,
            sid=n // 20,  # 20 frames per synthetic system, like a short trajectory
            fid=n % 20,
        )


def write_raw(
    pool_dir: Path, out_dir: Path, *, frames: int, shard_size: int, shard: str, seed: int
) -> int:
    """Raw shards ``k`` with ``k % n == i`` (``shard`` "i/n") of ``frames`` OC20-sized
    frames made from the raw frames in ``pool_dir``: one task of a job array."""
    from forcenet.data import raw

    i, n = (int(x) for x in shard.split("/"))
    pool = [f for path in raw.list_shards(pool_dir) for f in raw.iter_shard(path)]
    written = 0
    for k in range(i, -(-frames // shard_size), n):
        start = k * shard_size
        count = min(shard_size, frames - start)
        written += raw.write_shard(out_dir, k, oc20_sized(pool, count, seed=seed, start=start))
    return written


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write OC20-sized synthetic raw shards.")
    parser.add_argument("pool", type=Path, help="raw split folder of generated frames")
    parser.add_argument("out", type=Path, help="raw split folder to write")
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--shard", default="0/1", help="i/n: write shards k % n == i")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    count = write_raw(
        args.pool,
        args.out,
        frames=args.frames,
        shard_size=args.shard_size,
        shard=args.shard,
        seed=args.seed,
    )
    print(f"synthetic: wrote {count} frames to {args.out} (shard {args.shard})")


if __name__ == "__main__":
    main()
