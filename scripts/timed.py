"""`python scripts/timed.py LABEL CMD...`: run CMD and print its wall time and CPU. Exits with CMD's status;
scripts/test.sh runs the suite under it.

Up to three CPU figures. "processes" is what `time` reports: the CPU of CMD's processes as their parents
reaped them. It misses most of the work of a Ray job: Ray's raylet ignores SIGCHLD, so the kernel reaps its
workers (the vLLM engines, the DeepSpeed ranks, the reward replicas) without adding their time to any parent
(measured: tests/integration/test_actors.py alone, 15 s by `time`, 66 s on the machine's counters).
"machine" is the user (and nice: Ray runs its workers at nice 15) and system time of all CPUs from
/proc/stat over the run: every process counted, whoever else's. "CMD's processes" is exact, where this runs
as root beside a cgroup v1 `cpuacct` hierarchy: CMD runs in a cgroup of its own, and every process it
starts, Ray's workers included, is charged there whoever reaps it (else the figure is left out). This process
is also a child subreaper: what CMD leaves orphaned comes back here, is reaped, and is named if still
running 30 s after CMD ends."""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


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


def own_cgroup() -> Path | None:
    """A fresh cpuacct cgroup for CMD, inside this process's own (cpuacct counts a group's children in it: a
    run timed inside a timed run is in both figures); None where none can be made (not root, no cgroup v1)."""
    here = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            here = path
    folder = CPUACCT / here.lstrip("/") / f"prorank-timed-{os.getpid()}"
    try:
        folder.mkdir()
    except OSError:
        return None
    return folder


def cgroup_user_cpu(folder: Path) -> float:
    """User CPU seconds charged to `folder` (cpuacct.stat counts in clock ticks), its dead processes too."""
    stat = dict(line.split() for line in (folder / "cpuacct.stat").read_text().splitlines())
    return int(stat["user"]) / os.sysconf("SC_CLK_TCK")


def remove_cgroup(folder: Path) -> str:
    """Move what still runs in `folder` to the group it is in, then remove it; "" or why it stays (the
    report and CMD's exit status must not be lost to a cgroup that would not go)."""
    for pid in (folder / "cgroup.procs").read_text().split():
        try:
            (folder.parent / "cgroup.procs").write_text(pid)
        except OSError:  # it ended meanwhile
            pass
    try:
        folder.rmdir()
    except OSError as err:
        return f"; cgroup {folder} left: {err.strerror}"
    return ""


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
    cgroup = own_cgroup()
    join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    child = subprocess.Popen(command, preexec_fn=join)
    while True:
        try:
            status = child.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: let CMD end its own way
            continue
    left = reap(30.0)
    wall, user = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    user1, system1 = machine_cpu()
    own = ""
    if cgroup:
        mine = cgroup_user_cpu(cgroup)
        own = f"; user CPU, CMD's processes (a cgroup): {minutes(mine)} = {100 * mine / wall:.0f}% of wall"
        own += remove_cgroup(cgroup)
    print(
        f"{label}: {minutes(wall)} wall on {os.cpu_count()} cores; user CPU, machine: {minutes(user1 - user0)}"
        f" = {100 * (user1 - user0) / wall:.0f}% of wall (system {system1 - system0:.0f} s){own}; user CPU,"
        f" processes (as `time` counts it): {minutes(user)} = {100 * user / wall:.0f}% of wall"
        + (f"; still running: {left}" if left else ""),
        flush=True,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
