"""Worker-process pools whose workers die with the process that started them.

Used by the shard jobs of :mod:`forcenet.data.jobs` (preprocess, neighbors) and by the
EMT generator (:mod:`forcenet.emt.generate`). A pool's workers wait for work on a pipe
that they hold open themselves, so without help they outlive a parent killed with
SIGKILL or SIGTERM (neither runs the parent's cleanup), and with them the
``resource_tracker`` process that they keep alive: each worker here exits as soon as its
parent is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCHDOG_PERIOD_S = 0.5


def _watch_parent(parent: int) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (it died)."""
    while os.getppid() == parent:
        time.sleep(_WATCHDOG_PERIOD_S)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the pool's owner) dies.

    On Linux the kernel sends SIGKILL at once (``prctl(PR_SET_PDEATHSIG)``; it fires when
    the thread that started the worker ends, here the pool owner's calling thread). A
    watchdog thread polling ``os.getppid()`` is the portable fallback; checking once
    right away also covers a parent that died before the ``prctl`` call.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog alone
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watchdog").start()


def _start_worker(parent: int, initializer: Callable[[], None] | None) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer()


def worker_pool(
    workers: int, *, start_method: str, initializer: Callable[[], None] | None = None
) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes started with ``start_method`` (``"fork"`` or
    ``"spawn"``) that run ``initializer()`` first (a module-level function: spawned
    workers import it) and exit when this process dies (:func:`die_with_parent`)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context(start_method),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer),
    )
