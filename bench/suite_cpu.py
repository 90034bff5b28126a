"""Where the suite's CPU goes: a pytest plugin that charges each test module's CPU to it, subprocesses included.

    PRORANK_TIMED=1 bash scripts/test.sh -p bench.suite_cpu     # needs root and a cgroup v1 cpuacct hierarchy

Before each test, the pytest process (a worker under xdist) moves into a cgroup of the test's module; what it
starts from then on (a `prorank train` job, Ray, its vLLM engines and DeepSpeed ranks) is born there and
stays there. Neither `time` nor the machine's counters can tell this: Ray's raylet lets the kernel reap its
workers (scripts/timed.py), and on a busy machine the counters mix all workers' modules. At the end the
controller prints CPU seconds (user + system) per module, most first. A Ray started by a session fixture
is charged to the module that first asked for it, with all that later modules do on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
ROOT_ENV = "PRORANK_SUITE_CPU_CGROUP"  # the run's cgroup folder, set by the controller for its workers


def _module_cgroup(root: Path, nodeid: str) -> Path:
    module = nodeid.split("::", 1)[0].removesuffix(".py")
    return root / re.sub(r"[^A-Za-z0-9_.-]", "_", module)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made the folder
        return
    if not os.access(CPUACCT / "cgroup.procs", os.W_OK):
        raise pytest.UsageError(f"bench.suite_cpu: {CPUACCT} is not a writable cgroup v1 cpuacct hierarchy (root?)")
    root = CPUACCT / f"prorank-suite-{os.getpid()}"
    root.mkdir(exist_ok=True)
    os.environ[ROOT_ENV] = str(root)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    group = _module_cgroup(Path(os.environ[ROOT_ENV]), item.nodeid)
    group.mkdir(exist_ok=True)
    (group / "cgroup.procs").write_text(str(os.getpid()))


def module_cpu(root: Path) -> dict[str, float]:
    """CPU seconds per module folder under `root` (cpuacct.usage: nanoseconds, user + system)."""
    return {g.name: int((g / "cpuacct.usage").read_text()) / 1e9 for g in root.iterdir() if g.is_dir()}


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    root = Path(os.environ[ROOT_ENV])
    (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))  # out of the last module's group
    used = module_cpu(root)
    terminalreporter.section("CPU per test module (bench.suite_cpu)")
    for name, seconds in sorted(used.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
    terminalreporter.write_line(f"{sum(used.values()):8.1f} s  in all")
    for group in [*root.iterdir(), root]:  # a group some process still lives in stays (rmdir refuses)
        if group.is_dir():
            try:
                group.rmdir()
            except OSError:
                pass
