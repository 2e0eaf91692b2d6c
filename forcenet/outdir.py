"""The output folder of one training run: used by one run at a time, fresh or resumed.

Two runs writing checkpoints into the same folder would interleave their files and both
report success; :func:`exclusive_folder` makes the second one fail at once with a clear
error. The lock is an advisory ``flock`` on ``<folder>/.lock``: the operating system
releases it when the holder exits, even after ``kill -9``, so a killed run never leaves
a stale lock behind. :func:`prepare_run_folder` decides between a fresh run and a
resumed one: a fresh run never silently mixes with the files of an earlier one.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


#: Files a training run writes into its folder (removed by a fresh run with overwrite).
RUN_FILES = ("last.pt", "best.pt", "history.csv", "run_id.txt")


class FolderLockedError(RuntimeError):
    """Another process is writing into the folder."""


@contextmanager
def exclusive_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) inside the block.

    Raises :class:`FolderLockedError` naming the folder and the holder's pid when another
    process holds it.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderLockedError(
                f"{path}: another run (pid {holder}) is writing into this folder; "
                "wait for it to finish or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
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
