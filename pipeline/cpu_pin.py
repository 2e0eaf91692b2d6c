"""Opt-in: run the pipeline on fixed code paths of its numerical libraries.

numpy, OpenBLAS and torch pick their SIMD kernels from the CPU they run on, and those
kernels round differently, so the embedded EMT data generated on one kind of CPU differ
in the last bits from another's; the differences grow along each BFGS relaxation and MD
run (``data/raw``'s md5 moves, and every figure after it by up to about 1 %). Two
libraries decide the generated data (torch is not involved):

* numpy's dispatched loops: ``np.exp`` (EMT's density and pair terms) has its own AVX-512
  kernel, so the first EMT energy and forces already differ between AVX-512 and AVX2;
* OpenBLAS in the BFGS update (``dot``, ``eigh``): it picks SkylakeX kernels on Intel
  AVX-512 CPUs and Haswell-class kernels on AVX2 CPUs and on AMD ones; they differ from
  the second BFGS step on.

Pins (off by default: the committed results were computed without one):

* ``avx2``: numpy's AVX-512 targets off (``NPY_DISABLE_CPU_FEATURES``), OpenBLAS's core
  type Haswell (``OPENBLAS_CORETYPE``), and torch's kernels AVX2 (``ATEN_CPU_CAPABILITY``,
  MKL's ``MKL_CBWR``, oneDNN's ``ONEDNN_MAX_CPU_ISA``). An Intel AVX-512 machine then
  generates what an AVX2 machine does, bit for bit (the full default dataset:
  ``data/raw`` ``c4ec7e43...``, ``data/is2rs`` ``7e1456f9...``). An AVX2 machine's libraries
  already take these paths.
* ``openblas``: only OpenBLAS's core type Haswell. An Intel AVX-512 machine then uses the
  kernels an AMD AVX-512 machine uses (numpy AVX-512, OpenBLAS Haswell-class): the
  ``data/is2rs`` of an AMD EPYC run, ``254ec6fd...``, is reproduced bit for bit.

Whether torch's training and evaluation then match another machine's was not checked
(no other machine's weights to compare); ``avx2`` pins torch as far as its variables go.

The variables must be set before the interpreter loads numpy, and must reach the worker
processes the stages spawn, so the pin is applied around the command that starts the
stages rather than inside a stage (no stage's code or command changes, so ``dvc.lock``
stays valid)::

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

#: The pins by name (see the module docstring).
PINS = ("avx2", "openblas")
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
    if name == "openblas":
        return {"OPENBLAS_CORETYPE": AVX2_ENV["OPENBLAS_CORETYPE"]}
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
    p.add_argument("pin", nargs="?", choices=PINS, help="the pin to apply (see above)")
    p.add_argument("--export", action="store_true", help="print `export` lines for a shell")
    p.add_argument("--report", action="store_true", help="print this process's CPU state")
    args = p.parse_args(own)
    if args.report:
        print(json.dumps(report(), indent=2))
        return
    if args.pin is None:
        p.error(f"give a pin ({' or '.join(PINS)}) and a command, or --report")
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
    try:  # a bad pin or command: one line, as the stages print it (no pandas import here)
        main()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
