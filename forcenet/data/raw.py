"""The raw OC20 S2EF file layout: LZMA-compressed extended-XYZ shards with sidecars.

A split folder holds pairs ``<k>.extxyz.xz`` (many frames, ASE-readable extended XYZ)
and ``<k>.txt.xz`` whose line ``n`` is ``random<sid>,frame<fid>,<reference_energy>``
for frame ``n`` of the shard. Each frame is::

    <N>
    Lattice="ax ay az bx by bz cx cy cz" Properties=species:S:1:pos:R:3:move_mask:L:1:\
tags:I:1:forces:R:3 energy=<eV> free_energy=<eV> pbc="T T T"
    <symbol> <x> <y> <z> <T|F> <tag> <fx> <fy> <fz>      (N lines; Å and eV/Å)

``move_mask`` False marks an atom held by ASE's ``FixAtoms`` (``Frame.fixed`` True).
This module handles the files (xz streams, sidecars, shard folders); the text of a frame
is written and parsed by :mod:`forcenet.data.extxyz`. Reading streams: one frame in
memory at a time, whatever the shard size (OC20 shards hold ~5000 frames).
"""

from __future__ import annotations

import contextlib
import itertools
import lzma
import re
from collections.abc import Generator, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

from forcenet.atomic import atomic_write
from forcenet.data.extxyz import (
    atom_arrays,
    cell_pbc,
    format_frame,
    header_energy,
    optional_energy,
    parse_comment,
    parse_properties,
)
from forcenet.data.frame import Frame, FrameError
from forcenet.data.shards import (
    TXT_SUFFIX,
    XYZ_SUFFIX,
    RawFormatError,
    check_regular_file,
    list_shards,
    sidecar_path,
)

__all__ = [
    "TXT_SUFFIX",
    "XYZ_SUFFIX",
    "RawFormatError",
    "check_regular_file",
    "count_frames",
    "iter_shard",
    "iter_split",
    "list_shards",
    "sidecar_path",
    "write_shard",
]

# xz level for shards we write: 1 compresses ~10x faster than xz's default 6 (8 vs 0.7 MB/s
# measured) for ~15 % larger files; readers do not care which level was used.
XZ_PRESET = 1

_SIDECAR = re.compile(r"random(-?\d+),frame(-?\d+),(\S+)")


# --------------------------------------------------------------------------- writing


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
                xyz.write(format_frame(frame))
                txt.write(
                    f"random{int(frame.sid)},frame{int(frame.fid)},{frame.reference_energy!r}\n"
                )
                count += 1
        if count == 0:  # readers treat an empty shard as corrupt, so never write one
            raise RawFormatError(f"{xyz_path}: no frames to write")
    return count


# --------------------------------------------------------------------------- reading


_CHUNK = 1 << 20  # compressed bytes read from the file at a time
# compressed bytes given to the decoder at a time: what it decoded from the piece in which
# it meets damage is lost, so a small piece keeps every frame before the damage readable
_PIECE = 1 << 10


def _xz_lines(path: Path) -> Generator[bytes, None, None]:
    """The lines of an xz file (multi-stream too), every intact line before a defect.

    ``lzma.open`` behind a read buffer can lose what it had decoded when the stream
    ends early or is damaged (a defect reported at the first frame); decoding
    :data:`_PIECE` bytes at a time here yields each complete line first, then raises
    ``EOFError`` (truncated) or ``lzma.LZMAError`` (corrupt) where the data stop making
    sense. A final line without its newline is kept only when the stream ended properly.
    """
    decoder, pending, data, fresh = lzma.LZMADecompressor(), b"", b"", False
    with open(path, "rb") as fh:
        while True:
            if decoder.eof:  # a stream ended: another may follow (xz allows concatenation)
                data = decoder.unused_data + data or fh.read(_CHUNK)
                if not data:
                    break
                decoder, fresh = lzma.LZMADecompressor(), True
            piece = b""
            if decoder.needs_input:
                if not data:
                    data = fh.read(_CHUNK)
                    if not data:
                        raise EOFError("the file ends before the end-of-stream marker")
                piece, data = data[:_PIECE], data[_PIECE:]
            try:
                text = decoder.decompress(piece, _CHUNK * 8)
            except lzma.LZMAError:
                if fresh:  # padding or garbage after a complete stream: ignored, as lzma.open
                    break
                raise
            fresh = False
            if text:
                lines = (pending + text).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line + b"\n"
    if pending:
        yield pending


class _Lines:
    """Numbered line reader over an xz file; decoder errors name the file and line, and
    the callers' ``what`` says which record was being read."""

    def __init__(self, path: Path) -> None:
        self.path, self.lineno = path, 0  # lineno = lines consumed
        self._lines = _xz_lines(path)

    def read(self, count: int, what: str) -> list[bytes]:
        """Up to ``count`` lines (fewer at end of file)."""
        lines: list[bytes] = []
        try:
            lines.extend(itertools.islice(self._lines, count))
        except (EOFError, lzma.LZMAError) as exc:
            self.lineno += len(lines)
            raise RawFormatError(
                f"{self.path}: {what}, line {self.lineno + 1}: corrupt or truncated xz data "
                f"({exc}); the {self.lineno} lines before it are intact"
            ) from exc
        self.lineno += len(lines)
        return lines

    def close(self) -> None:
        """Close the file now (a reader abandoned mid-shard does not wait for the GC)."""
        self._lines.close()


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


def _frame_what(index: int) -> str:
    """What is being read, for a decoder error: the frame and the last intact one."""
    last = f"the last good frame is {index - 1}" if index else "no frame before it"
    return f"frame {index} ({last})"


def _read_frame(xyz: _Lines, index: int) -> tuple[dict, dict, str] | None:
    """Header info, per-atom arrays and location of the next frame; None at end of file."""
    what = _frame_what(index)
    while True:
        head = xyz.read(1, what)
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
    comment = xyz.read(1, what)
    lines = xyz.read(n, what)
    if not comment or len(lines) < n:
        raise RawFormatError(f"{where}: file ends inside the frame (expected {n} atom rows)")
    info = parse_comment(comment[0].decode("utf-8", "replace"), where)
    columns, ncol = parse_properties(info.get("properties"), where)
    return info, atom_arrays(lines, columns, ncol, where, count_line + 2), where


def iter_shard(xyz_path: Path) -> Iterator[Frame]:
    """Stream the frames of one ``<k>.extxyz.xz`` shard, labelled from its sidecar.

    Every frame is validated; any defect (bad xz data, malformed header or row, unknown
    element, non-finite numbers, zero-volume periodic cell, sidecar row count that does
    not match) raises :class:`RawFormatError` naming the file, frame index and line.
    """
    xyz_path = Path(xyz_path)
    txt_path = sidecar_path(xyz_path)
    if not txt_path.exists():
        raise RawFormatError(f"{xyz_path}: sidecar {txt_path.name} is missing")
    check_regular_file(xyz_path)
    check_regular_file(txt_path)
    xyz, txt = _Lines(xyz_path), _Lines(txt_path)
    index = 0
    with contextlib.closing(xyz), contextlib.closing(txt):
        while (parsed := _read_frame(xyz, index)) is not None:
            info, atoms, where = parsed
            sid, fid, reference = _sidecar_row(txt, xyz_path, index)
            cell, pbc = cell_pbc(info, where)
            frame = Frame(
                **atoms,
                cell=cell,
                pbc=pbc,
                total_energy=header_energy(info, "energy", where),
                reference_energy=reference,
                sid=sid,
                fid=fid,
                free_energy=optional_energy(info, "free_energy", where),
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


def count_frames(split_dir: Path) -> int:
    """Frames in a split, counted from the sidecars (fast: no extxyz decoding)."""
    total = 0
    for xyz_path in list_shards(split_dir):
        txt_path = sidecar_path(xyz_path)
        check_regular_file(txt_path)
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
