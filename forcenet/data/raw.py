"""The raw OC20 S2EF file layout: LZMA-compressed extended-XYZ shards with sidecars.

A split folder holds pairs ``<k>.extxyz.xz`` (many frames, ASE-readable extended XYZ)
and ``<k>.txt.xz`` whose line ``n`` is ``random<sid>,frame<fid>,<reference_energy>``
for frame ``n`` of the shard. Each frame is::

    <N>
    Lattice="ax ay az bx by bz cx cy cz" Properties=species:S:1:pos:R:3:move_mask:L:1:\
tags:I:1:forces:R:3 energy=<eV> free_energy=<eV> pbc="T T T"
    <symbol> <x> <y> <z> <T|F> <tag> <fx> <fy> <fz>      (N lines; Å and eV/Å)

``move_mask`` False marks an atom held by ASE's ``FixAtoms`` (``Frame.fixed`` True).
The reader below parses this layout itself (ASE's reader is ~10x slower) and streams:
one frame in memory at a time, whatever the shard size (OC20 shards hold ~5000 frames).
"""

from __future__ import annotations

import functools
import io
import itertools
import lzma
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

import numpy as np
from ase.data import atomic_numbers as _ASE_Z
from ase.data import chemical_symbols

from forcenet.atomic import atomic_write
from forcenet.data.frame import Frame, FrameError

XYZ_SUFFIX = ".extxyz.xz"
TXT_SUFFIX = ".txt.xz"
# xz level for shards we write: 1 compresses ~10x faster than xz's default 6 (8 vs 0.7 MB/s
# measured) for ~15 % larger files; readers do not care which level was used.
XZ_PRESET = 1

_SYMBOL_TO_Z = {s.encode(): z for s, z in _ASE_Z.items() if 1 <= z <= 118}
_TRUE = frozenset((b"T", b"True", b"true", b"TRUE"))
_FALSE = frozenset((b"F", b"False", b"false", b"FALSE"))
# key, then optionally = and a value: "double", 'single', {braced} or bare.
_KEY_VALUE = re.compile(
    r"""\s*([A-Za-z_][^\s=]*)(?:\s*=\s*("[^"]*"|'[^']*'|\{[^}]*\}|[^\s"'{]+))?"""
)
_SIDECAR = re.compile(r"random(-?\d+),frame(-?\d+),(\S+)")


class RawFormatError(ValueError):
    """A raw shard that does not follow the OC20 layout; names the file and record."""


# --------------------------------------------------------------------------- writing


def _format_frame(frame: Frame) -> str:
    """The extxyz text of one frame (OC20 column layout, >= 10 decimals)."""
    cell = " ".join(repr(float(v)) for v in np.asarray(frame.cell, dtype=np.float64).ravel())
    pbc = " ".join("T" if p else "F" for p in frame.pbc)
    head = (
        f'Lattice="{cell}" '
        "Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3 "
        f"energy={float(frame.total_energy)!r} "
    )
    if frame.free_energy is not None:
        head += f"free_energy={float(frame.free_energy)!r} "
    head += f'pbc="{pbc}"'
    rows = [str(frame.natoms), head]
    for z, p, free, tag, f in zip(
        frame.atomic_numbers.tolist(),
        np.asarray(frame.pos, dtype=np.float64).tolist(),
        (~np.asarray(frame.fixed, dtype=bool)).tolist(),
        frame.tags.tolist(),
        np.asarray(frame.forces, dtype=np.float64).tolist(),
        strict=True,
    ):
        rows.append(
            f"{chemical_symbols[z]:<2s} {p[0]:.10f} {p[1]:.10f} {p[2]:.10f} "
            f"{'T' if free else 'F'} {int(tag)} {f[0]:.10f} {f[1]:.10f} {f[2]:.10f}"
        )
    return "\n".join(rows) + "\n"


def write_shard(directory: Path, k: int, frames: Iterable[Frame]) -> int:
    """Write shard ``k`` (``<k>.extxyz.xz`` + ``<k>.txt.xz``) into ``directory``.

    Each frame is validated first. Both files are written under temporary names and
    renamed only after everything succeeded, the sidecar last, so a crash never leaves
    a pair that :func:`list_shards` would accept. Returns the number of frames written
    (at least one: an empty shard is refused).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    xyz_path, txt_path = directory / f"{k}{XYZ_SUFFIX}", directory / f"{k}{TXT_SUFFIX}"
    count = 0
    # ExitStack renames in reverse order of entry: the frames first, the sidecar last.
    with ExitStack() as files:
        txt_tmp = files.enter_context(atomic_write(txt_path))
        xyz_tmp = files.enter_context(atomic_write(xyz_path))
        with (
            lzma.open(xyz_tmp, "wt", encoding="ascii", preset=XZ_PRESET) as xyz,
            lzma.open(txt_tmp, "wt", encoding="ascii", preset=XZ_PRESET) as txt,
        ):
            for frame in frames:
                frame.validate(f"{xyz_path}: frame {count}")
                xyz.write(_format_frame(frame))
                txt.write(
                    f"random{int(frame.sid)},frame{int(frame.fid)},{frame.reference_energy!r}\n"
                )
                count += 1
        if count == 0:  # readers treat an empty shard as corrupt, so never write one
            raise RawFormatError(f"{xyz_path}: no frames to write")
    return count


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class _Column:
    name: str
    kind: str  # one of S (string), R (real), I (integer), L (logical)
    start: int  # first token index in a row
    width: int  # number of tokens


def _parse_comment(line: str, where: str) -> dict[str, str | None]:
    """``key=value`` pairs of an extxyz comment line; quotes/braces stripped, keys lowercased."""
    out: dict[str, str | None] = {}
    pos, end = 0, len(line.rstrip())
    while pos < end:
        m = _KEY_VALUE.match(line, pos)
        if m is None or m.end() == pos:
            raise RawFormatError(
                f"{where}: cannot parse comment line near {line[pos : pos + 30]!r}"
            )
        value = m.group(2)
        if value is not None and value[0] in "\"'{":
            value = value[1:-1]
        out[m.group(1).lower()] = value
        pos = m.end()
    return out


@functools.lru_cache(maxsize=64)  # a shard repeats the same few Properties= specs
def _columns(spec: str) -> tuple[dict[str, _Column], int]:
    """Columns of ``Properties=name:type:ncols:...`` and the number of tokens per row."""
    parts = spec.split(":")
    if len(parts) % 3 != 0:
        raise ValueError(f"Properties={spec!r} is not name:type:ncols triples")
    columns: dict[str, _Column] = {}
    start = 0
    for name, kind, width in zip(parts[0::3], parts[1::3], parts[2::3], strict=True):
        if kind not in "SRIL" or len(kind) != 1 or not width.isdigit() or int(width) < 1:
            raise ValueError(f"bad Properties entry {name}:{kind}:{width}")
        columns[name.lower()] = _Column(name.lower(), kind, start, int(width))
        start += int(width)
    return columns, start


def _parse_properties(spec: str | None, where: str) -> tuple[dict[str, _Column], int]:
    if spec is None:
        raise RawFormatError(f"{where}: no Properties= in the comment line")
    try:
        return _columns(spec)
    except ValueError as exc:
        raise RawFormatError(f"{where}: {exc}") from None


def _floats(text: str | None, n: int, key: str, where: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in (text or "").replace(",", " ").split()])
    except ValueError:
        values = np.empty(0)
    if values.shape != (n,):
        raise RawFormatError(f"{where}: {key}={text!r} must hold {n} numbers")
    return values


def _parse_pbc(text: str | None, where: str) -> np.ndarray:
    flags = (text or "").split()
    if len(flags) != 3 or not all(f.encode() in _TRUE | _FALSE for f in flags):
        raise RawFormatError(f"{where}: pbc={text!r} must be three of T/F")
    return np.array([f.encode() in _TRUE for f in flags])


def _energy(info: dict[str, str | None], key: str, where: str, *, required: bool) -> float | None:
    if key not in info:
        if required:
            raise RawFormatError(f"{where}: no {key}= in the comment line (S2EF needs labels)")
        return None
    try:
        return float(info[key] or "")
    except ValueError as exc:
        raise RawFormatError(f"{where}: {key}={info[key]!r} is not a number") from exc


# --------------------------------------------------------------------------- atom rows


def _bad_row(
    lines: list[bytes], ncol: int, where: str, first: int, col: _Column | None
) -> NoReturn:
    """Find the offending row for an error message (only called once a block failed)."""
    for r, line in enumerate(lines):
        tokens = line.split()
        if len(tokens) != ncol:
            raise RawFormatError(
                f"{where}, line {first + r}: expected {ncol} columns, got {len(tokens)}: {line[:80]!r}"
            )
        if col is not None:
            try:
                [float(t) for t in tokens[col.start : col.start + col.width]]
            except ValueError:
                raise RawFormatError(
                    f"{where}, line {first + r}: column {col.name!r} is not numeric: {line[:80]!r}"
                ) from None
    raise RawFormatError(f"{where}: malformed atom rows")  # pragma: no cover - defensive


def _numeric(cols: list[list[bytes]], col: _Column, ctx: tuple) -> np.ndarray:
    """Column ``col`` as float64 [N, width]."""
    try:
        flat = list(
            map(float, itertools.chain.from_iterable(cols[col.start : col.start + col.width]))
        )
    except ValueError:
        _bad_row(*ctx, col)
    return np.array(flat, dtype=np.float64).reshape(col.width, -1).T  # [N, width]


def _logical(cols: list[list[bytes]], col: _Column, where: str) -> np.ndarray:
    """Column ``col`` as bool [N, width]."""
    tokens = list(itertools.chain.from_iterable(cols[col.start : col.start + col.width]))
    bad = [t for t in tokens if t not in _TRUE and t not in _FALSE]
    if bad:
        raise RawFormatError(f"{where}: column {col.name!r} has non-logical value {bad[0]!r}")
    return np.array([t in _TRUE for t in tokens]).reshape(col.width, -1).T  # [N, width]


def _integers(values: np.ndarray, name: str, where: str) -> np.ndarray:
    if not np.all(values == np.round(values)):
        raise RawFormatError(f"{where}: column {name!r} holds non-integer values")
    return values.astype(np.int64)


def _species(cols: list[list[bytes]], columns: dict[str, _Column], ctx: tuple) -> np.ndarray:
    """Atomic numbers [N] from a ``species`` (symbols) or ``Z`` column."""
    where = ctx[2]
    if "species" in columns:
        symbols = cols[columns["species"].start]
        try:
            return np.array([_SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64)
        except KeyError as exc:
            raise RawFormatError(
                f"{where}: unknown element symbol {exc.args[0].decode()!r}"
            ) from None
    if "z" in columns:
        return _integers(_numeric(cols, columns["z"], ctx)[:, 0], "Z", where)
    raise RawFormatError(f"{where}: Properties has neither species nor Z")


def _fixed(cols: list[list[bytes]], columns: dict[str, _Column], ctx: tuple) -> np.ndarray:
    """Per-atom fixed flags [N]: ``move_mask`` False, or a ``fixed`` column; default all free."""
    where, n = ctx[2], len(ctx[0])
    if "move_mask" in columns:
        move = _logical(cols, columns["move_mask"], where)  # [N, 1] or [N, 3]
        partial = move.any(axis=1) & ~move.all(axis=1)
        if partial.any():
            raise RawFormatError(
                f"{where}: atom {int(np.argmax(partial))} is fixed along some axes only "
                "(FixCartesian); only whole-atom constraints are supported"
            )
        return ~move[:, 0]
    if "fixed" in columns:
        col = columns["fixed"]
        if col.kind == "L":
            return _logical(cols, col, where)[:, 0]
        return _numeric(cols, col, ctx)[:, 0] != 0
    return np.zeros(n, dtype=bool)


def _atom_arrays(
    lines: list[bytes], columns: dict[str, _Column], ncol: int, where: str, first: int
) -> dict[str, np.ndarray]:
    """Per-atom arrays of one frame; ``first`` is the file line number of row 0."""
    ctx = (lines, ncol, where, first)
    tokens = b" ".join(lines).split()
    if len(tokens) != len(lines) * ncol:
        _bad_row(*ctx, None)
    cols = [tokens[c::ncol] for c in range(ncol)]  # token column c -> N tokens
    for need in ("pos", "forces"):
        if need not in columns or columns[need].width != 3 or columns[need].kind != "R":
            raise RawFormatError(f"{where}: Properties needs a {need}:R:3 column")
    tags = np.ones(len(lines), dtype=np.int64)  # OC20: 1 = surface atom; the default
    if "tags" in columns:
        tags = _integers(_numeric(cols, columns["tags"], ctx)[:, 0], "tags", where)
    return {
        "atomic_numbers": _species(cols, columns, ctx),
        "pos": _numeric(cols, columns["pos"], ctx),
        "forces": _numeric(cols, columns["forces"], ctx),
        "tags": tags,
        "fixed": _fixed(cols, columns, ctx),
    }


# --------------------------------------------------------------------------- reading


class _Lines:
    """Numbered line reader over a decompressing stream; decoder errors name the file."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self.stream, self.path, self.lineno = stream, path, 0  # lineno = lines consumed

    def read(self, count: int, what: str) -> list[bytes]:
        """Up to ``count`` lines (fewer at end of file)."""
        try:
            lines = list(itertools.islice(self.stream, count))
        except (EOFError, lzma.LZMAError) as exc:
            raise RawFormatError(
                f"{self.path}: {what}: corrupt or truncated xz data after line {self.lineno} ({exc})"
            ) from exc
        self.lineno += len(lines)
        return lines


def sidecar_path(xyz_path: Path) -> Path:
    """``<k>.txt.xz`` next to ``<k>.extxyz.xz``."""
    xyz_path = Path(xyz_path)
    if not xyz_path.name.endswith(XYZ_SUFFIX):
        raise RawFormatError(f"{xyz_path}: shard name must end in {XYZ_SUFFIX}")
    return xyz_path.with_name(xyz_path.name[: -len(XYZ_SUFFIX)] + TXT_SUFFIX)


def _sidecar_row(txt: _Lines, xyz_path: Path, index: int) -> tuple[int, int, float]:
    """(sid, fid, reference_energy) for frame ``index``."""
    lines = txt.read(1, f"row for frame {index}")
    if not lines or not lines[0].strip():
        raise RawFormatError(
            f"{txt.path}: has {index} rows but {xyz_path} has more frames "
            f"(no row for frame {index}, line {index + 1})"
        )
    text = lines[0].decode("ascii", "replace").strip()
    m = _SIDECAR.fullmatch(text)
    try:
        if m is None:
            raise ValueError
        return int(m.group(1)), int(m.group(2)), float(m.group(3))
    except ValueError:
        raise RawFormatError(
            f"{txt.path}, line {txt.lineno} (frame {index}): expected "
            f"'random<sid>,frame<fid>,<reference_energy>', got {text[:80]!r}"
        ) from None


def _read_frame(xyz: _Lines, index: int) -> tuple[dict, dict, str] | None:
    """Header info, per-atom arrays and location of the next frame; None at end of file."""
    while True:
        head = xyz.read(1, f"frame {index}")
        if not head:
            return None
        if head[0].strip():
            break
    count_line = xyz.lineno
    where = f"{xyz.path}: frame {index} (line {count_line})"
    try:
        n = int(head[0])
    except ValueError:
        raise RawFormatError(f"{where}: expected an atom count, got {head[0][:80]!r}") from None
    if n < 1:
        raise RawFormatError(f"{where}: atom count {n} must be positive")
    comment = xyz.read(1, f"frame {index}")
    lines = xyz.read(n, f"frame {index}")
    if not comment or len(lines) < n:
        raise RawFormatError(f"{where}: file ends inside the frame (expected {n} atom rows)")
    info = _parse_comment(comment[0].decode("utf-8", "replace"), where)
    columns, ncol = _parse_properties(info.get("properties"), where)
    return info, _atom_arrays(lines, columns, ncol, where, count_line + 2), where


def _cell_pbc(info: dict[str, str | None], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Cell [3, 3] and pbc [3]; as in ASE, a Lattice without pbc= means periodic."""
    if "lattice" not in info:
        pbc = _parse_pbc(info["pbc"], where) if "pbc" in info else np.zeros(3, dtype=bool)
        if pbc.any():
            raise RawFormatError(f"{where}: pbc={info['pbc']!r} but no Lattice=")
        return np.zeros((3, 3)), pbc
    cell = _floats(info["lattice"], 9, "Lattice", where).reshape(3, 3)
    pbc = _parse_pbc(info["pbc"], where) if "pbc" in info else np.ones(3, dtype=bool)
    return cell, pbc


def iter_shard(xyz_path: Path) -> Iterator[Frame]:
    """Stream the frames of one ``<k>.extxyz.xz`` shard, labelled from its sidecar.

    Every frame is validated; any defect (bad xz data, malformed header or row, unknown
    element, non-finite numbers, zero-volume periodic cell, sidecar row count that does
    not match) raises :class:`RawFormatError` naming the file, frame index and line.
    """
    xyz_path = Path(xyz_path)
    txt_path = sidecar_path(xyz_path)
    if not txt_path.is_file():
        raise RawFormatError(f"{xyz_path}: sidecar {txt_path.name} is missing")
    with (
        io.BufferedReader(lzma.open(xyz_path, "rb"), buffer_size=1 << 20) as xyz_stream,
        lzma.open(txt_path, "rb") as txt_stream,
    ):
        xyz, txt = _Lines(xyz_stream, xyz_path), _Lines(txt_stream, txt_path)
        index = 0
        while (parsed := _read_frame(xyz, index)) is not None:
            info, atoms, where = parsed
            sid, fid, reference = _sidecar_row(txt, xyz_path, index)
            cell, pbc = _cell_pbc(info, where)
            frame = Frame(
                **atoms,
                cell=cell,
                pbc=pbc,
                total_energy=_energy(info, "energy", where, required=True),
                reference_energy=reference,
                sid=sid,
                fid=fid,
                free_energy=_energy(info, "free_energy", where, required=False),
            )
            try:
                frame.validate(where)
            except FrameError as exc:
                raise RawFormatError(str(exc)) from exc
            yield frame
            index += 1
        if index == 0:
            raise RawFormatError(f"{xyz_path}: empty shard (no frames)")
        extra = [line for line in txt.read(1, "end") if line.strip()]
        if extra:
            raise RawFormatError(
                f"{txt_path}: has more rows than the {index} frames of {xyz_path} "
                f"(extra row at line {txt.lineno})"
            )


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
        if not sidecar_path(path).is_file():
            raise RawFormatError(f"{path}: sidecar {sidecar_path(path).name} is missing")
        shards.append((int(stem), path))
    if not shards:
        raise RawFormatError(f"{split_dir}: no *{XYZ_SUFFIX} shards")
    return [path for _, path in sorted(shards)]


def count_frames(split_dir: Path) -> int:
    """Frames in a split, counted from the sidecars (fast: no extxyz decoding)."""
    total = 0
    for xyz_path in list_shards(split_dir):
        txt_path = sidecar_path(xyz_path)
        try:
            with lzma.open(txt_path, "rb") as txt:
                total += sum(1 for line in txt if line.strip())
        except (EOFError, lzma.LZMAError) as exc:
            raise RawFormatError(f"{txt_path}: corrupt or truncated xz data ({exc})") from exc
    return total


def iter_split(split_dir: Path) -> Iterator[Frame]:
    """All frames of a split folder, shard by shard in order of ``k``."""
    for xyz_path in list_shards(split_dir):
        yield from iter_shard(xyz_path)
