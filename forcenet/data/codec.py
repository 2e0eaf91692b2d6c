"""Safe binary encoding of a record (a dict of numpy arrays) for LMDB values.

Layout: ``b"FNR1"``, a little-endian uint32 header length, a UTF-8 JSON header
``[[name, dtype, shape, offset, nbytes], ...]``, then the raw array bytes. Decoding
only reads numbers: no pickle, nothing that could execute code. Object dtypes are
refused on both sides.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"FNR1"
_ALLOWED_KINDS = set("biuf")  # bool, int, uint, float


class RecordDecodeError(ValueError):
    """A value that is not a valid record."""


def encode(record: dict[str, np.ndarray]) -> bytes:
    header = []
    chunks = []
    offset = 0
    for name, value in record.items():
        arr = np.asarray(value, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"field {name!r}: dtype {arr.dtype} cannot be stored")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header.append([name, arr.dtype.newbyteorder("<").str, list(arr.shape), offset, len(data)])
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def decode(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    buf = bytes(buf)
    if len(buf) < 8 or buf[:4] != MAGIC:
        raise RecordDecodeError("not a forcenet record (bad magic)")
    (hlen,) = struct.unpack("<I", buf[4:8])
    body_start = 8 + hlen
    if body_start > len(buf):
        raise RecordDecodeError("truncated record header")
    try:
        header = json.loads(buf[8:body_start])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordDecodeError(f"corrupt record header: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    body = memoryview(buf)[body_start:]
    for name, dtype_str, shape, offset, nbytes in header:
        dtype = np.dtype(dtype_str)
        if dtype.kind not in _ALLOWED_KINDS:
            raise RecordDecodeError(f"field {name!r}: dtype {dtype} not allowed")
        if (
            offset + nbytes > len(body)
            or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes
        ):
            raise RecordDecodeError(f"field {name!r}: size does not match its header")
        arr = np.frombuffer(body[offset : offset + nbytes], dtype=dtype).reshape(shape)
        out[name] = arr.astype(dtype.newbyteorder("="), copy=True)
    return out
