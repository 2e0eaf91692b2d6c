"""Output folders used by one run at a time: a training run's (fresh or resumed), a store's.

Two runs writing checkpoints into the same folder would interleave their files and both
report success; :func:`exclusive_folder` makes the second one fail at once with a clear
error. The lock is an advisory ``flock`` on ``<folder>/.lock``: the operating system
releases it when the holder exits, even after ``kill -9``, so a killed run never leaves
a stale lock behind; the lock file is never a symbolic link, so it cannot empty another
file. :func:`prepare_run_folder` decides between a fresh run and a
resumed one: a fresh run never silently mixes with the files of an earlier one.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forcenet.atomic import NotRegularFileError, open_regular, remove_stale_temporaries

LOCK_FILE = ".lock"


#: Files a training run writes into its folder (removed by a fresh run with overwrite).
RUN_FILES = ("last.pt", "best.pt", "history.csv", "run_id.txt")


class FolderLockedError(RuntimeError):
    """Another process is writing into the folder."""


def _open_lock(path: Path) -> int:
    """The lock file's descriptor; a symbolic link or a non-regular file is refused, never
    followed or truncated (a planted ``.lock`` link would otherwise empty its target)."""
    lock = path / LOCK_FILE
    try:
        return open_regular(lock, os.O_RDWR | os.O_CREAT)
    except NotRegularFileError as exc:
        raise FolderLockedError(f"cannot lock {path}: {exc}") from None


def _lock(fd: int, path: Path, mode: int) -> None:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        who = f"another run (pid {holder})" if holder else "another run (a `--shard` task?)"
        raise FolderLockedError(
            f"{path}: {who} is writing into this folder; "
            "wait for it to finish or choose another output folder"
        ) from None


@contextmanager
def exclusive_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) inside the block.

    Raises :class:`FolderLockedError` naming the folder and the holder's pid when another
    process holds it, or when ``.lock`` is a symbolic link or not a regular file. Once
    the lock is held, the temporary files that killed writers left in the folder are
    removed (:func:`forcenet.atomic.remove_stale_temporaries`).
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path)
    try:
        _lock(fd, path, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            remove_stale_temporaries(path)
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def shared_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold a shared lock of ``folder`` inside the block: for the tasks of a job array,
    which write disjoint files of one folder side by side. Any number of shared holders
    may coexist; :func:`exclusive_folder` is refused while one runs, and this while an
    exclusive holder runs (:class:`FolderLockedError`)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path)
    try:
        _lock(fd, path, fcntl.LOCK_SH)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def prepare_run_folder(folder: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> None:
    """Make ``folder`` ready for a run (call it while holding :func:`exclusive_folder`).

    ``resume``: keep everything (training continues from ``last.pt``). Otherwise a folder
    holding files of an earlier run is refused unless ``overwrite``, which removes them.
    """
    path = Path(folder)
    if resume and overwrite:
        raise ValueError("choose one of resume and overwrite")
    found = [name for name in RUN_FILES if (path / name).exists()]
    if resume or not found:
        return
    if not overwrite:
        raise FileExistsError(
            f"{path}: holds an earlier run ({', '.join(found)}); pass --resume to continue "
            "it or --overwrite to start afresh"
        )
    for name in found:
        (path / name).unlink()
