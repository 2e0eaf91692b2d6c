"""What the two physics stages share: the structures they run on, the MD settings of
``physics.md``, and the MD line of a stage's log."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pandas as pd

from forcenet.physics.md import MD_SPLIT
from pipeline.params import MDConfig

if TYPE_CHECKING:
    from ase import Atoms

    from forcenet.physics.md import NVESettings


def physics_structures(
    is2rs: Path, splits: Sequence[str], count: int
) -> tuple[list[Atoms], list[str]]:
    """The first ``count`` IS2RS initial structures of ``splits``, taken in turn from each
    split, named ``<split>:<sid>`` (fewer when the splits hold fewer); a missing file is a
    FileNotFoundError naming it, no structure at all a ValueError."""
    from ase.io import read

    per_split: list[list[tuple[Atoms, str]]] = []
    for split in splits:
        path = Path(is2rs) / f"{split}_initial.extxyz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: IS2RS file not found (run the data stage)")
        images = (
            cast(list, read(str(path), index=":", format="extxyz")) if path.stat().st_size else []
        )
        per_split.append([(a, f"{split}:{a.info.get('sid', k)}") for k, a in enumerate(images)])
    picked: list[tuple[Atoms, str]] = []
    for rank in range(max((len(s) for s in per_split), default=0)):
        picked += [s[rank] for s in per_split if rank < len(s)]
    picked = picked[:count]
    if not picked:
        raise ValueError(f"{is2rs}: no IS2RS initial structures for splits {list(splits)}")
    return [a for a, _ in picked], [n for _, n in picked]


def has_structures(is2rs: Path) -> bool:
    """Whether ``is2rs`` holds initial structures (the data sources other than the
    embedded one leave it empty: no oracle to check against), said in one line if not."""
    if any(Path(is2rs).glob("*_initial.extxyz")):
        return True
    print(f"physics: no IS2RS structures in {is2rs}; nothing to check")
    return False


def nve_settings(md: MDConfig) -> NVESettings:
    """``physics.md`` as the library's :class:`~forcenet.physics.md.NVESettings`."""
    from forcenet.physics.md import NVESettings

    return NVESettings(
        temperature_K=md.temperature_K,
        timestep_fs=md.timestep_fs,
        steps=md.steps,
        interval=md.interval,
        seed=md.seed,
    )


def md_line(long: pd.DataFrame) -> str:
    """A one-line account of the MD rows of a long table, for the stage's last line."""
    m = long[long.split == MD_SPLIT].set_index("metric")["value"]
    first = m["first_event_ps"]
    events = "no event" if not math.isfinite(first) else f"first event at {first:.3f} ps"
    return (
        f"MD |drift| {m['drift_abs_mean']:.2e} eV/atom/ps, stable {m['stable_fraction']:.2f}, "
        f"{events}"
    )
