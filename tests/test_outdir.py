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
