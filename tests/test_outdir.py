"""One run per output folder: an exclusive lock, and fresh runs that never mix with old ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from forcenet.outdir import FolderLockedError, exclusive_folder, prepare_run_folder

HOLD = """
import sys, time
from forcenet.outdir import exclusive_folder
with exclusive_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=rf"pid {holder.pid}.*another output folder"):
            with exclusive_folder(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the lock dies with its holder, even on kill -9
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive_folder(tmp_path):
                break
        except FolderLockedError:
            assert time.monotonic() < deadline, "lock not released after kill -9"
            time.sleep(0.05)


def test_fresh_run_refuses_an_earlier_one_unless_told(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"old")
    (tmp_path / "run_id.txt").write_text("abc\n")
    with pytest.raises(FileExistsError, match="last.pt, run_id.txt"):
        prepare_run_folder(tmp_path, resume=False, overwrite=False)
    prepare_run_folder(tmp_path, resume=True, overwrite=False)  # resume keeps it all
    assert (tmp_path / "last.pt").is_file()
    prepare_run_folder(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "run_id.txt").exists()
    prepare_run_folder(tmp_path / "new", resume=False, overwrite=False)  # nothing to refuse


def test_a_lock_that_is_a_symbolic_link_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(FolderLockedError, match=r"run/\.lock: is a symbolic link.*remove it"):
        with exclusive_folder(out):
            pass
    assert victim.read_text() == "keep me\n"


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(FolderLockedError, match=r"\.lock: not a regular file \(a FIFO\)"):
        with exclusive_folder(tmp_path):
            pass


def test_temporaries_of_killed_writers_are_removed_when_the_folder_is_taken(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = [tmp_path / f".last.pt.{dead.pid}.0a1b2c3d.tmp", tmp_path / f".last.pt.{dead.pid}.tmp"]
    live = tmp_path / f".best.pt.{os.getpid()}.0a1b2c3d.tmp"  # a writer still running
    other = tmp_path / ".notes.tmp"  # not a name the atomic writer uses
    for path in [*stale, live, other]:
        path.write_bytes(b"partial")
    with exclusive_folder(tmp_path):
        assert not any(p.exists() for p in stale)
        assert live.exists() and other.exists()


def test_shared_holders_coexist_and_exclude_an_exclusive_one(tmp_path):
    from forcenet.outdir import shared_folder

    with shared_folder(tmp_path), shared_folder(tmp_path):
        with pytest.raises(FolderLockedError, match="another run"):
            with exclusive_folder(tmp_path):
                pass
    with exclusive_folder(tmp_path):
        with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()}"):
            with shared_folder(tmp_path):
                pass
