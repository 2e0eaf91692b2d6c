"""Atomic file output: every file is written to a temporary name and renamed when complete.

A crash, a full disk or a kill never leaves a half-written file under the final name; the
previous version (if any) stays in place until the new one is complete.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PendingFile:
    """A file being written under a temporary name beside ``path``: :meth:`commit` renames
    it onto ``path``, :meth:`abort` removes it. For writers that outlive one block (e.g. a
    streaming Parquet writer); otherwise use :func:`atomic_write`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(
            f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        )

    def commit(self) -> Path:
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file does not exist yet: the caller creates and writes it (with any writer: ``savefig``, ``to_parquet``,
    ``lmdb.open``, ...). On an exception the temporary file is removed and ``path`` is left
    as it was. Parent folders are created.
    """
    pending = PendingFile(path)
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.abort()
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
