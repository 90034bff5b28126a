"""scripts/timed.py, the suite's clock: the CPU of a process the kernel reaps for a parent that ignores
SIGCHLD (as Ray's raylet does for its workers) is in the cgroup figure, not in `time`'s."""

import os
import re
import subprocess
import sys

import pytest

from bench.suite_cpu import CPUACCT
from tests.jobs import ROOT

# The parent ignores SIGCHLD and forks a child that spins for 1.5 s of CPU: the kernel reaps it, and its time
# is added to no parent's.
RAYLET_LIKE = """
import os, resource, signal, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
if os.fork() == 0:
    while resource.getrusage(resource.RUSAGE_SELF).ru_utime < 1.5:
        sum(i * i for i in range(200_000))  # user time, a chunk between two looks at the clock
    os._exit(0)
time.sleep(0.2)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
"""


def seconds(figure: str) -> int:
    minutes, secs = figure.split(" min ")
    return 60 * int(minutes) + int(secs.removesuffix(" s"))


@pytest.mark.skipif(not os.access(CPUACCT / "cgroup.procs", os.W_OK), reason="needs root and cgroup v1 cpuacct")
def test_a_child_reaped_by_the_kernel_is_counted_in_the_cgroup_figure_only():
    timed = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "timed.py"), "job", sys.executable, "-c", RAYLET_LIKE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = timed.communicate(timeout=120)
    assert timed.returncode == 0, stderr
    line = stdout.strip()
    own = re.search(r"CMD's processes \(a cgroup\): (\d+ min \d+ s)", line)
    counted = re.search(r"as `time` counts it\): (\d+ min \d+ s)", line)
    assert own and counted, line
    assert seconds(own.group(1)) >= 1 and seconds(counted.group(1)) == 0, line
    # Its cgroup is inside this process's (the suite itself may run under timed.py), and gone.
    assert not list(CPUACCT.rglob(f"prorank-timed-{timed.pid}")), "its cgroup was left behind"
