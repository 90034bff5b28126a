"""`python scripts/timed.py LABEL CMD...`: run CMD and print its wall time and CPU. Exits with CMD's status;
scripts/test.sh runs the suite under it.

Two CPU figures. "processes" is what `time` reports: the CPU of CMD's processes as their parents reaped them.
It misses most of the work of a Ray job: Ray's raylet ignores SIGCHLD, so the kernel reaps its workers (the
vLLM engines, the DeepSpeed ranks, the reward replicas) without adding their time to any parent (measured:
tests/integration/test_actors.py alone, 15 s by `time`, 66 s on the machine's counters). "machine" is the
user (and nice: Ray runs its workers at nice 15) and system time of all CPUs from /proc/stat over the run:
every process counted, and on a machine that runs nothing else (CI), the suite's own. This process is also a
child subreaper: what CMD leaves orphaned comes back here, is reaped, and is named if still running 30 s
after CMD ends."""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def reap(seconds: float) -> list[int]:
    """Wait for the orphans handed to us; the pids of those still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []
        if pid == 0:
            time.sleep(0.2)
    return [child.pid for child in psutil.Process().children()]


def machine_cpu() -> tuple[float, float]:
    """(user + nice, system) seconds of all CPUs since boot (psutil reads /proc/stat)."""
    cpu = psutil.cpu_times()
    return cpu.user + cpu.nice, cpu.system


def minutes(seconds: float) -> str:
    whole = round(seconds)  # rounded before the split: 659.6 s is 11 min 00 s, not 10 min 60 s
    return f"{whole // 60} min {whole % 60:02d} s"


def main() -> int:
    label, command = sys.argv[1], sys.argv[2:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # What this process's children used before it (scripts/test.sh execs it after the install and the
    # checks: their CPU stays in its counters across the exec) is not the command's.
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start, (user0, system0) = time.monotonic(), machine_cpu()
    child = subprocess.Popen(command)
    while True:
        try:
            status = child.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: let CMD end its own way
            continue
    left = reap(30.0)
    wall, user = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    user1, system1 = machine_cpu()
    print(
        f"{label}: {minutes(wall)} wall on {os.cpu_count()} cores; user CPU, machine: {minutes(user1 - user0)}"
        f" = {100 * (user1 - user0) / wall:.0f}% of wall (system {system1 - system0:.0f} s); user CPU, processes"
        f" (as `time` counts it): {minutes(user)} = {100 * user / wall:.0f}% of wall"
        + (f"; still running: {left}" if left else ""),
        flush=True,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
