"""Opt-in: run the pipeline on the AVX2 code paths of its numerical libraries.

numpy, OpenBLAS and torch pick their SIMD kernels from the CPU they run on, and those
kernels round differently: the embedded EMT data generated on an AVX-512 machine differ in
the last bits from those of an AVX2 machine, and the differences grow along each BFGS
relaxation and MD run (``data/raw``'s md5 moves, and every figure after it by up to about
1 %). Two libraries decide the generated data:

* numpy's dispatched loops: ``np.exp`` (EMT's density and pair terms) has its own AVX-512
  kernel, so the first EMT energy and forces already differ;
* OpenBLAS in the BFGS update (``dot``, ``eigh``): its SkylakeX kernels differ from its
  Haswell ones from the second BFGS step on.

``avx2`` disables numpy's AVX-512 targets (``NPY_DISABLE_CPU_FEATURES``) and sets
OpenBLAS's core type to Haswell (``OPENBLAS_CORETYPE``); with both, an AVX-512 machine
generates the AVX2 machine's data bit for bit. For training and evaluation it also sets
torch's kernels to AVX2 (``ATEN_CPU_CAPABILITY``, MKL's ``MKL_CBWR``, oneDNN's
``ONEDNN_MAX_CPU_ISA``). On an AVX2 machine the pin changes nothing. It is off by default:
the committed results were computed without it.

The variables must be set before the interpreter loads numpy, and must reach the worker
processes the stages spawn, so the pin is applied around the command that starts the
stages rather than inside a stage::

    make repro CPU_PIN=avx2                              # or make exp CPU_PIN=avx2 ARGS=...
    python -m pipeline.cpu_pin avx2 -- dvc repro         # any command, e.g. dvc exp run
    eval "$(python -m pipeline.cpu_pin avx2 --export)"   # this shell, then dvc repro
    python -m pipeline.cpu_pin --report                  # what this process and a worker use

benchmarks/bench_cpu_pin.py measures what each variable costs
(reports/benchmarks/cpu_pin.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

#: The pins by name; "avx2" is the only one.
PINS = ("avx2",)
#: What ``avx2`` sets besides numpy's variable (which depends on the numpy build).
AVX2_ENV = {
    "OPENBLAS_CORETYPE": "Haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
#: Every variable a pin may set (``--report`` shows them).
PIN_VARIABLES = ("NPY_DISABLE_CPU_FEATURES", *AVX2_ENV)


def _numpy_cpu() -> tuple[dict[str, bool], list[str]]:
    """numpy's detected CPU features and its dispatch targets (numpy 1.x and 2.x)."""
    import importlib

    try:
        umath = importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy < 2
        umath = importlib.import_module("numpy.core._multiarray_umath")
    return dict(umath.__cpu_features__), list(umath.__cpu_dispatch__)


def pin_env(name: str) -> dict[str, str]:
    """The environment variables of pin ``name`` on this machine; a ValueError if the
    pin is unknown or this CPU cannot run it (no AVX2 and FMA: the kernels would crash)."""
    if name not in PINS:
        raise ValueError(f"unknown CPU pin {name!r}; known: {', '.join(PINS)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"CPU pin {name!r} is for x86-64 CPUs, this is {platform.machine()}")
    features, targets = _numpy_cpu()
    lacking = [f for f in ("AVX2", "FMA3") if not features.get(f)]
    if lacking:
        raise ValueError(f"CPU pin {name!r} needs a CPU with {' and '.join(lacking)}")
    # numpy's AVX-512 dispatch targets (2.4: X86_V4 AVX512_ICL AVX512_SPR; earlier:
    # AVX512F AVX512_SKX ...): disabling a target the CPU lacks is harmless.
    avx512 = [t for t in targets if t == "X86_V4" or t.startswith("AVX512")]
    return {"NPY_DISABLE_CPU_FEATURES": " ".join(avx512), **AVX2_ENV}


def cpu_state() -> dict[str, Any]:
    """What this process computes with: the pin variables, numpy's active dispatch
    targets, OpenBLAS's core type and torch's CPU capability."""
    from threadpoolctl import threadpool_info

    features, targets = _numpy_cpu()
    state: dict[str, Any] = {
        "env": {k: os.environ.get(k) for k in PIN_VARIABLES},
        "numpy_targets": [t for t in targets if features.get(t)],
        "openblas": sorted(
            {
                str(i.get("architecture"))
                for i in threadpool_info()
                if i["internal_api"] == "openblas"
            }
        ),
    }
    try:
        import torch

        state["torch"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        state["torch"] = None
    return state


def report() -> dict[str, Any]:
    """:func:`cpu_state` of this process and of a spawned worker (as the stages' pools)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        worker = pool.submit(cpu_state).result()
    return {"process": cpu_state(), "worker": worker}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, command = argv[:split], argv[split + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m pipeline.cpu_pin",
        description=(__doc__ or "").strip(),
        formatter_class=argparse.RawTextHelpFormatter,
        usage="%(prog)s [--report] [PIN [--export | -- COMMAND ...]]",
    )
    p.add_argument("pin", nargs="?", choices=PINS, help="the pin to apply")
    p.add_argument("--export", action="store_true", help="print `export` lines for a shell")
    p.add_argument("--report", action="store_true", help="print this process's CPU state")
    args = p.parse_args(own)
    if args.report:
        print(json.dumps(report(), indent=2))
        return
    if args.pin is None:
        p.error("give a pin (avx2) and a command, or --report")
    env = pin_env(args.pin)
    if args.export:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
        return
    if not command:
        p.error("give the command to run after --, e.g. -- dvc repro")
    os.environ.update(env)
    sys.stdout.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise OSError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from exc


if __name__ == "__main__":
    from pipeline import stage

    stage.run(main)
