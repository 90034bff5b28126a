"""A command ends the processes it started before it returns (driver/processes.py), orphans included, and
leaves alone those its process had before (a caller's Ray, a test's servers) and theirs."""

from __future__ import annotations

import subprocess
import time

import psutil

from prorank.driver.processes import ending_descendants


def test_the_commands_processes_end_and_those_from_before_stay(capsys):
    before = subprocess.Popen(["sleep", "60"])
    try:
        with ending_descendants(grace=0.5):
            child = subprocess.Popen(["sleep", "60"])
            # An orphan: its parent exits at once, so it is re-parented to this process (the subreaper).
            orphaner = subprocess.run(
                ["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            )
            orphan = psutil.Process(int(orphaner.stdout))
            assert orphan.ppid() == psutil.Process().pid
        assert child.poll() is not None  # SIGTERM after the grace, reaped
        deadline = time.monotonic() + 5
        while orphan.is_running() and orphan.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not orphan.is_running()
        assert before.poll() is None  # not this command's
        assert "could not end" not in capsys.readouterr().err
    finally:
        before.kill()
        before.wait(timeout=10)
