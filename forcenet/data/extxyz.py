"""Extended-XYZ text of one frame, both ways: OC20's column layout written, and read back
(comment-line ``key=value`` pairs, ``Properties=`` columns, per-atom arrays, cell/pbc).

The parser is our own (ASE's reader is ~10x slower) and checks as it goes: every error
is a :class:`RawFormatError` naming the file, frame and line. The shard files around
these frames (xz, sidecars, folders) are :mod:`forcenet.data.raw`.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
from ase.data import atomic_numbers as _ASE_Z
from ase.data import chemical_symbols

from forcenet.data.frame import Frame
from forcenet.data.shards import RawFormatError

_SYMBOL_TO_Z = {s.encode(): z for s, z in _ASE_Z.items() if 1 <= z <= 118}
_TRUE = frozenset((b"T", b"True", b"true", b"TRUE"))
_FALSE = frozenset((b"F", b"False", b"false", b"FALSE"))
# key, then optionally = and a value: "double", 'single', {braced} or bare.
_KEY_VALUE = re.compile(
    r"""\s*([A-Za-z_][^\s=]*)(?:\s*=\s*("[^"]*"|'[^']*'|\{[^}]*\}|[^\s"'{]+))?"""
)


# --------------------------------------------------------------------------- writing


def format_frame(frame: Frame) -> str:
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


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class _Column:
    name: str
    kind: str  # one of S (string), R (real), I (integer), L (logical)
    start: int  # first token index in a row
    width: int  # number of tokens


def parse_comment(line: str, where: str) -> dict[str, str | None]:
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


def parse_properties(spec: str | None, where: str) -> tuple[dict[str, _Column], int]:
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


def header_energy(info: dict[str, str | None], key: str, where: str) -> float:
    """The number ``key=`` of a comment line; it must be there (S2EF frames are labelled)."""
    if key not in info:
        raise RawFormatError(f"{where}: no {key}= in the comment line (S2EF needs labels)")
    try:
        return float(info[key] or "")
    except ValueError as exc:
        raise RawFormatError(f"{where}: {key}={info[key]!r} is not a number") from exc


def optional_energy(info: dict[str, str | None], key: str, where: str) -> float | None:
    """The number ``key=`` of a comment line, or None when it has none."""
    return header_energy(info, key, where) if key in info else None


def cell_pbc(info: dict[str, str | None], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Cell [3, 3] and pbc [3]; as in ASE, a Lattice without pbc= means periodic."""
    if "lattice" not in info:
        pbc = _parse_pbc(info["pbc"], where) if "pbc" in info else np.zeros(3, dtype=bool)
        if pbc.any():
            raise RawFormatError(f"{where}: pbc={info['pbc']!r} but no Lattice=")
        return np.zeros((3, 3)), pbc
    cell = _floats(info["lattice"], 9, "Lattice", where).reshape(3, 3)
    pbc = _parse_pbc(info["pbc"], where) if "pbc" in info else np.ones(3, dtype=bool)
    return cell, pbc


# --------------------------------------------------------------------------- atom rows

#: The atom rows of one frame, for error messages: (lines, tokens per row, where, file
#: line number of row 0).
_Rows = tuple[list[bytes], int, str, int]


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


def _numeric(cols: list[list[bytes]], col: _Column, ctx: _Rows) -> np.ndarray:
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


def _species(cols: list[list[bytes]], columns: dict[str, _Column], ctx: _Rows) -> np.ndarray:
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


def _fixed(cols: list[list[bytes]], columns: dict[str, _Column], ctx: _Rows) -> np.ndarray:
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


def atom_arrays(
    lines: list[bytes], columns: dict[str, _Column], ncol: int, where: str, first: int
) -> dict[str, np.ndarray]:
    """Per-atom arrays of one frame; ``first`` is the file line number of row 0."""
    ctx: _Rows = (lines, ncol, where, first)
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
