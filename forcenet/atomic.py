"""Atomic file output: every file is written to a temporary name and renamed when complete.

A crash, a full disk or a kill never leaves a half-written file under the final name; the
previous version (if any) stays in place until the new one is complete. A kill can leave
the temporary file itself (``.<name>.<pid>.<hex>.tmp``): :func:`remove_stale_temporaries`
removes those of processes that no longer exist. A file that must be written in place (a
lock, a partial download) is opened with :func:`open_regular`, which never follows a
symbolic link: a link planted under that name would otherwise have its target emptied.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NotRegularFileError(OSError):
    """A path to be written in place that is a symbolic link or not a regular file."""


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags)`` for a file written in place, refusing anything but a
    regular file: a symbolic link is never followed (``O_NOFOLLOW``), and a FIFO, device
    or folder is refused without blocking. Raises :class:`NotRegularFileError` naming
    ``path``. Returns the file descriptor."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(
                f"{path}: is a symbolic link, which is never written through; remove it"
            ) from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise NotRegularFileError(f"{path}: not a regular file; remove it") from None
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise NotRegularFileError(f"{path}: not a regular file ({_describe(kind)}); remove it")
    os.set_blocking(fd, True)
    return fd


def _describe(kind: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(kind):
            return name
    return "not a plain file"


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

    The temporary file does not exist yet: the caller creates and writes it (with any
    writer: ``savefig``, ``to_parquet``, ``lmdb.open``, ...). On an exception the temporary
    file is removed and ``path`` is left as it was. Parent folders are created.
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


#: Name of a temporary file of :class:`PendingFile` (``.<name>.<pid>.<hex>.tmp``).
_TEMPORARY = re.compile(r"\..+\.(\d+)(?:\.[0-9a-f]+)?\.tmp")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files in ``folder`` that a killed process left behind.

    Only names of :class:`PendingFile` (``.<name>.<pid>.<hex>.tmp``) whose process no
    longer runs on this machine are removed; call it while holding the folder's lock, so
    that no other writer shares the folder. Returns the removed paths.
    """
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or path.is_dir() or _alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)  # a symbolic link is removed, never followed
        removed.append(path)
    return removed
