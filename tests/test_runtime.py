"""forcenet.runtime.tune_malloc: safe to call anywhere, reports what it applied."""

from __future__ import annotations

import platform
import subprocess
import sys

import torch

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
    # allocations large enough to be mmap'd by default still work (and are freed)
    for _ in range(3):
        x = torch.ones(12_000_000)  # 48 MB
        assert float(x.sum()) == 12_000_000
        del x


def test_tune_malloc_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setenv("FORCENET_TUNE_MALLOC", "0")
    assert tune_malloc() == {}


def test_tune_malloc_never_raises_without_libc(monkeypatch) -> None:
    monkeypatch.delenv("FORCENET_TUNE_MALLOC", raising=False)

    def broken(*args, **kwargs):
        raise OSError("no libc")

    monkeypatch.setattr("forcenet.runtime.ctypes.CDLL", broken)
    assert tune_malloc() == {}


def test_tune_malloc_in_a_fresh_process() -> None:
    code = "from forcenet.runtime import tune_malloc; import torch; tune_malloc(); print(torch.ones(10**7).sum().item())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000000.0"
