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


_FAULTS = """
import resource, sys, torch
from forcenet.runtime import tune_malloc
if sys.argv[1] == "tuned":
    tune_malloc()
x = torch.ones(4_000_000); del x  # 16 MB: mmap'd or trimmed by default, kept once tuned
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(4_000_000); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="the tuning applies to glibc malloc only",
)
def test_tuned_malloc_keeps_freed_activations_mapped() -> None:
    """What the tuning is for: a freed 16 MB activation is reused without page faults,
    where default glibc returns it to the OS and faults it in again at every allocation
    (5 x ~3,900 pages)."""

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True, env={**os.environ, "FORCENET_TUNE_MALLOC": "1"})  # fmt: skip
        return int(out.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    assert default > 5 * 3_000
    assert tuned < default / 20
