"""Where the raw shards of a split are, without reading them: the ``<k>.extxyz.xz`` +
``<k>.txt.xz`` pairs of a split folder (:func:`list_shards`), a shard's number and its
identity on disk (name, sizes, mtimes: what makes a frame store current), and the check
that an input is a regular file. The contents are :mod:`forcenet.data.raw`'s."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

XYZ_SUFFIX = ".extxyz.xz"
TXT_SUFFIX = ".txt.xz"


class RawFormatError(ValueError):
    """A raw shard that does not follow the OC20 layout; names the file and record."""


def check_regular_file(path: Path) -> None:
    """Raise :class:`RawFormatError` naming ``path`` when it exists but is not a regular
    file (links followed): reading a FIFO, device or socket would block or never end. A
    missing file is left to the reader, which names it in its own words."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise RawFormatError(f"{path}: not a regular file (a FIFO, device or socket); refused")


def sidecar_path(xyz_path: Path) -> Path:
    """``<k>.txt.xz`` next to ``<k>.extxyz.xz``."""
    xyz_path = Path(xyz_path)
    if not xyz_path.name.endswith(XYZ_SUFFIX):
        raise RawFormatError(f"{xyz_path}: shard name must end in {XYZ_SUFFIX}")
    return xyz_path.with_name(xyz_path.name[: -len(XYZ_SUFFIX)] + TXT_SUFFIX)


def list_shards(split_dir: Path) -> list[Path]:
    """The ``<k>.extxyz.xz`` shards of a split folder, sorted by ``k``; each needs its sidecar."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise RawFormatError(f"{split_dir}: not a folder")
    shards: list[tuple[int, Path]] = []
    for path in split_dir.glob(f"*{XYZ_SUFFIX}"):
        stem = path.name[: -len(XYZ_SUFFIX)]
        if not stem.isdigit():
            raise RawFormatError(f"{path}: shard name must be <integer>{XYZ_SUFFIX}")
        check_regular_file(path)
        if not sidecar_path(path).exists():
            raise RawFormatError(f"{path}: sidecar {sidecar_path(path).name} is missing")
        check_regular_file(sidecar_path(path))
        shards.append((int(stem), path))
    if not shards:
        raise RawFormatError(f"{split_dir}: no *{XYZ_SUFFIX} shards")
    return [path for _, path in sorted(shards)]


def shard_number(path: Path, position: int) -> int:
    """Number ``k`` of an input shard ``<k>.*`` (else its ``position`` in the listing)."""
    stem = path.name.split(".")[0]
    return int(stem) if stem.isdigit() else position


def source_identity(xyz_path: Path) -> dict[str, Any]:
    """Identity of a raw shard: name, size and mtime of its file and companions (``<k>.*``)."""
    xyz_path = Path(xyz_path)
    prefix = xyz_path.name.split(".")[0] + "."
    files = sorted(
        p for p in xyz_path.parent.iterdir() if p.name.startswith(prefix) and p.is_file()
    )
    return {
        "dir": str(xyz_path.parent.resolve()),
        "name": xyz_path.name,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
