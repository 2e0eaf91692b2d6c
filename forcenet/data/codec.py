"""Safe binary encoding of a record (a dict of numpy arrays) for LMDB values.

Layout: ``b"FNR2"``, a little-endian uint32 header length, a little-endian uint32 CRC-32
(:func:`zlib.crc32`) of everything after it, a UTF-8 JSON header
``[[name, dtype, shape, offset, nbytes], ...]``, then the raw array bytes. Decoding
only reads numbers: no pickle, nothing that could execute code. Object dtypes are
refused on both sides; so are NaN and inf in float arrays (a label or position that is
not a number is a broken record, not data). The checksum is verified on every decode,
so bytes damaged on disk are an error rather than wrong numbers.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np

MAGIC = b"FNR2"
#: Record layouts of older schema versions (magic -> schema version), for a clear error.
_OLD_MAGICS = {b"FNR1": 1}
_PREFIX = struct.Struct("<4sII")  # magic, header length, crc32 of header + body
_ALLOWED_KINDS = set("biuf")  # bool, int, uint, float


class RecordDecodeError(ValueError):
    """A value that is not a valid record."""


class RecordChecksumError(RecordDecodeError):
    """A record whose bytes do not match their checksum (damaged on disk)."""


class RecordEncodeError(ValueError):
    """A record that must not be stored (non-finite numbers)."""


def _non_finite(arr: np.ndarray) -> int:
    """Number of NaN/inf entries of a float array (0 for other kinds)."""
    if arr.dtype.kind != "f":
        return 0
    if arr.ndim == 0:  # energies: a scalar test is ~5x cheaper than the ufunc
        return 0 if math.isfinite(arr.item()) else 1
    finite = np.isfinite(arr)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def encode(record: dict[str, np.ndarray]) -> bytes:
    header = []
    chunks = []
    offset = 0
    for name, value in record.items():
        arr = np.asarray(value, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"field {name!r}: dtype {arr.dtype} cannot be stored")
        if bad := _non_finite(arr):
            raise RecordEncodeError(f"field {name!r}: {bad} non-finite value(s) (NaN or inf)")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header.append([name, arr.dtype.newbyteorder("<").str, list(arr.shape), offset, len(data)])
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join(chunks)
    crc = zlib.crc32(body, zlib.crc32(head))
    return _PREFIX.pack(MAGIC, len(head), crc) + head + body


def _check_prefix(buf: memoryview) -> int:
    """Header length of ``buf`` after checking its magic and checksum."""
    magic = bytes(buf[:4])
    if magic in _OLD_MAGICS:
        raise RecordDecodeError(
            f"record layout {magic.decode()} of schema version {_OLD_MAGICS[magic]}; "
            f"this code reads {MAGIC.decode()}: rebuild the store"
        )
    if len(buf) < _PREFIX.size or magic != MAGIC:
        raise RecordDecodeError("not a forcenet record (bad magic)")
    _, hlen, crc = _PREFIX.unpack_from(buf)
    actual = zlib.crc32(buf[_PREFIX.size :])
    if actual != crc:
        raise RecordChecksumError(
            f"checksum mismatch (stored {crc:08x}, computed {actual:08x}): "
            "the record's bytes are damaged"
        )
    return hlen


def decode(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """The record in ``buf``; every array is a fresh copy, so ``buf`` may be a buffer
    that is only valid for the moment (an LMDB read transaction's)."""
    buf = memoryview(buf)
    hlen = _check_prefix(buf)
    body_start = _PREFIX.size + hlen
    if body_start > len(buf):
        raise RecordDecodeError("truncated record header")
    try:
        header = json.loads(bytes(buf[_PREFIX.size : body_start]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordDecodeError(f"corrupt record header: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    body = buf[body_start:]
    for entry in header:
        try:
            name, dtype_str, shape, offset, nbytes = entry
            dtype = np.dtype(dtype_str)
        except (TypeError, ValueError) as exc:
            raise RecordDecodeError(f"corrupt record header entry {entry!r}: {exc}") from exc
        if dtype.kind not in _ALLOWED_KINDS:
            raise RecordDecodeError(f"field {name!r}: dtype {dtype} not allowed")
        if (
            not all(type(d) is int and d >= 0 for d in shape)
            or type(offset) is not int
            or type(nbytes) is not int
            or offset < 0
            or offset + nbytes > len(body)
            or math.prod(shape) * dtype.itemsize != nbytes
        ):
            raise RecordDecodeError(f"field {name!r}: size does not match its header")
        arr = np.frombuffer(body[offset : offset + nbytes], dtype=dtype).reshape(shape)
        if bad := _non_finite(arr):
            raise RecordDecodeError(f"field {name!r}: {bad} non-finite value(s) (NaN or inf)")
        out[name] = arr.astype(dtype.newbyteorder("="), copy=True)
    return out
