"""The opt-in CPU pin: its variables reach the stage processes and their spawned workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cpu_pin

ROOT = Path(__file__).resolve().parents[1]


def _unpinned_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in cpu_pin.PIN_VARIABLES}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _report(*prefix: str) -> dict:
    """``python -m pipeline.cpu_pin --report`` started through ``prefix``."""
    cmd = [*prefix, sys.executable, "-m", "pipeline.cpu_pin", "--report"]
    done = subprocess.run(
        cmd, cwd=ROOT, env=_unpinned_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _avx512_targets(targets: list[str]) -> list[str]:
    return [t for t in targets if t == "X86_V4" or t.startswith("AVX512")]


def test_pin_reaches_the_process_and_its_spawned_workers():
    try:
        expected = cpu_pin.pin_env("avx2")
    except ValueError as exc:  # not an x86-64 CPU with AVX2
        pytest.skip(str(exc))
    pinned = _report(sys.executable, "-m", "pipeline.cpu_pin", "avx2", "--")
    for where in ("process", "worker"):
        state = pinned[where]
        assert {k: v for k, v in state["env"].items() if v is not None} == expected, where
        assert _avx512_targets(state["numpy_targets"]) == [], where
        assert "X86_V3" in state["numpy_targets"] or "AVX2" in state["numpy_targets"], where
        assert state["openblas"] == ["Haswell"], where
        assert state["torch"] == "AVX2", where


def test_without_the_pin_the_libraries_use_the_whole_cpu():
    plain = _report()
    for state in plain.values():
        assert all(v is None for v in state["env"].values())
    features, _ = cpu_pin._numpy_cpu()
    if features.get("AVX512F") and features.get("AVX512_SKX"):  # an AVX-512 machine
        for state in plain.values():
            assert _avx512_targets(state["numpy_targets"])
            assert state["openblas"] != ["Haswell"]
            assert state["torch"] != "AVX2"


def test_pin_refuses_an_unknown_name_or_a_cpu_without_avx2(monkeypatch):
    with pytest.raises(ValueError, match="unknown CPU pin 'avx512'"):
        cpu_pin.pin_env("avx512")
    monkeypatch.setattr(cpu_pin.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_pin, "_numpy_cpu", lambda: ({"AVX": True, "FMA3": True}, ["AVX2"]))
    with pytest.raises(ValueError, match="'avx2' needs a CPU with AVX2"):
        cpu_pin.pin_env("avx2")
    monkeypatch.setattr(cpu_pin.platform, "machine", lambda: "aarch64")
    with pytest.raises(ValueError, match="for x86-64 CPUs, this is aarch64"):
        cpu_pin.pin_env("avx2")


def test_pin_disables_only_numpys_avx512_targets(monkeypatch):
    monkeypatch.setattr(cpu_pin.platform, "machine", lambda: "x86_64")
    features = {"AVX2": True, "FMA3": True}
    targets = ["X86_V3", "X86_V4", "AVX512_ICL", "AVX512_SPR"]  # numpy 2.4's
    monkeypatch.setattr(cpu_pin, "_numpy_cpu", lambda: (features, targets))
    env = cpu_pin.pin_env("avx2")
    assert env["NPY_DISABLE_CPU_FEATURES"] == "X86_V4 AVX512_ICL AVX512_SPR"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert cpu_pin.pin_env("openblas") == {"OPENBLAS_CORETYPE": "Haswell"}  # numpy as is


def test_make_repro_runs_dvc_through_the_pin_only_when_asked():
    def dry(*args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "-W", "pyproject.toml", "repro", *args],
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().splitlines()[-1].strip()

    assert dry() == ".venv/bin/dvc repro"
    assert dry("CPU_PIN=avx2") == ".venv/bin/python -m pipeline.cpu_pin avx2 -- .venv/bin/dvc repro"
