"""Process-level runtime tuning for CPU training.

glibc malloc serves every allocation above its mmap threshold (at most 32 MiB, and
dynamically raised only up to that) with a fresh ``mmap`` and returns it with ``munmap``
on free, and it trims the top of the heap back to the OS once more than 128 KiB are free
there. A training step allocates and frees the same large activations (e.g. ForceNet's
[E, H] edge tensors, ~40 MB at the paper size) every step, so each step page-faults its
whole working set in again: about 800k minor faults and a third of a 1-thread ForceNet
paper-config step (6.3 s -> 4.6 s once the memory is kept). :func:`tune_malloc` keeps it:
no mmap for allocations (``M_MMAP_MAX = 0``; glibc still falls back to mmap if the heap
cannot grow) and no trimming of the heap top (``M_TRIM_THRESHOLD`` = 2 GiB - 1). The cost
is a resident set that stays at its peak (+~25% peak RSS for the ForceNet paper config).

This is what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment
do, applied from Python at run time (``mallopt`` cannot raise the mmap threshold above
32 MiB, hence ``M_MMAP_MAX``). Set ``FORCENET_TUNE_MALLOC=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

#: glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: The settings applied: mallopt parameter name -> (number, value). mallopt takes an int.
MALLOC_SETTINGS: dict[str, tuple[int, int]] = {
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
}


def tune_malloc() -> dict[str, bool]:
    """Keep large freed blocks in the heap (glibc on Linux only; see the module docstring).

    Returns ``{setting: accepted}`` for each mallopt call made, ``{}`` where nothing was
    attempted (not Linux/glibc, ``FORCENET_TUNE_MALLOC=0``, or libc not loadable). Never
    raises; safe to call more than once.
    """
    try:
        if os.environ.get("FORCENET_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no"):
            return {}
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            return {}
        mallopt = ctypes.CDLL(None).mallopt  # the process's own (already loaded) libc
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return {name: bool(mallopt(p, v)) for name, (p, v) in MALLOC_SETTINGS.items()}
    except Exception:  # noqa: BLE001 -- tuning is optional, never fatal
        return {}
