"""forcenet.runtime.tune_malloc: safe to call anywhere, reports what it applied."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from forcenet.runtime import MALLOC_SETTINGS, tune_malloc


def test_tune_malloc_is_safe_and_reports_what_it_applied(monkeypatch) -> None:
    monkeypatch.delenv("FORCENET_TUNE_MALLOC", raising=False)
    applied = tune_malloc()
    assert isinstance(applied, dict)
    assert tune_malloc() == applied  # idempotent
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied == {name: True for name in MALLOC_SETTINGS}
    else:
        assert applied == {}


def test_tune_malloc_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setenv("FORCENET_TUNE_MALLOC", "0")
    assert tune_malloc() == {}


def test_tune_malloc_never_raises_without_libc(monkeypatch) -> None:
    monkeypatch.delenv("FORCENET_TUNE_MALLOC", raising=False)

    def broken(*args, **kwargs):
        raise OSError("no libc")

    monkeypatch.setattr("forcenet.runtime.ctypes.CDLL", broken)
    assert tune_malloc() == {}


_HEAP = """
import ctypes, sys, torch
from forcenet.runtime import tune_malloc
if sys.argv[1] == "tuned":
    tune_malloc()
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
top = libc.sbrk(0)
x = torch.ones(4_000_000)  # a 16 MB activation
grown = libc.sbrk(0) - top
del x
print(grown, libc.sbrk(0) - top)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="the tuning applies to glibc malloc only",
)
def test_tuned_malloc_serves_and_keeps_large_blocks_in_the_heap() -> None:
    """What the tuning does, in fresh processes: by default glibc maps a 16 MB block
    (mmap) and unmaps it on free; tuned, the block comes from the heap, and the heap keeps
    it after the free for the next step to reuse."""

    def heap(mode: str) -> tuple[int, int]:
        env = {**os.environ, "FORCENET_TUNE_MALLOC": "1"}
        out = subprocess.run(
            [sys.executable, "-c", _HEAP, mode], capture_output=True, text=True, check=True, env=env
        )
        grown, kept = (int(v) for v in out.stdout.split())
        return grown, kept

    assert heap("default") == (0, 0)
    grown, kept = heap("tuned")
    assert grown >= 16_000_000 and kept == grown
