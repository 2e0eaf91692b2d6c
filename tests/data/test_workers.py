"""Worker pools die with their parent: the EMT generator's as the shard jobs'."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # subprocesses import this checkout's code

_GENERATOR_POOL = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from forcenet.emt.generate import _mapper

    def job(i):
        Path(sys.argv[1], f"{i}.pid").write_text(str(os.getpid()))
        time.sleep(120)
        return i

    if __name__ == "__main__":
        with _mapper(2) as pmap:
            list(pmap(job, range(4)))
    """
)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> set[int]:
    """Direct children of ``pid`` (every thread's), from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(
    not Path("/proc/self/task").exists() or not sys.platform.startswith("linux"),
    reason="reads /proc",
)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_generator_workers_and_their_resource_tracker_die_when_the_parent_is_killed(tmp_path, sig):
    script = tmp_path / "generate_pool.py"
    script.write_text(_GENERATOR_POOL)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=ENV)
    pids: set[int] = set()
    try:
        pid_files = [tmp_path / "0.pid", tmp_path / "1.pid"]
        assert _wait(lambda: all(p.is_file() and p.read_text() for p in pid_files), 120)
        workers = {int(p.read_text()) for p in pid_files}
        pids = _children(parent.pid)  # the workers and multiprocessing's resource tracker
        assert workers < pids and all(_alive(pid) for pid in pids)
        parent.send_signal(sig)  # neither runs the pool's shutdown in the parent
        parent.wait(10)
        assert _wait(lambda: not any(_alive(pid) for pid in pids), 5), "pool outlived parent"
    finally:
        parent.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
