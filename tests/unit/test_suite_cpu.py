"""bench/suite_cpu.py charges a module the CPU of the processes its tests start."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bench import suite_cpu
from bench.suite_cpu import CPUACCT
from tests.jobs import ROOT

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass"  # a second of CPU
BUSY_CHILD = f"""
import subprocess, sys

def test_starts_a_busy_child():
    subprocess.run([sys.executable, "-c", {SPIN!r}], check=True)
"""
IDLE = "def test_nothing():\n    pass\n"


def _pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.suite_cpu", "-c", str(tmp_path / "pytest.ini"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not os.access(CPUACCT / "cgroup.procs", os.W_OK), reason="needs root and cgroup v1 cpuacct")
def test_a_module_is_charged_its_subprocesses_cpu(tmp_path):
    (tmp_path / "test_busy.py").write_text(BUSY_CHILD)
    (tmp_path / "test_idle.py").write_text(IDLE)
    before = set(CPUACCT.glob("prorank-suite-*"))
    done = _pytest(tmp_path, str(tmp_path / "test_busy.py"), str(tmp_path / "test_idle.py"))
    assert done.returncode == 0, done.stdout[-3000:]
    report = done.stdout.split("CPU per test module (bench.suite_cpu)", 1)[1].splitlines()
    seconds = {line.split()[-1]: float(line.split()[0]) for line in report if line.endswith(("_busy", "_idle"))}
    # The child's second of CPU is in its test's module, not in the other.
    assert seconds["test_busy"] >= 1.0 and seconds["test_idle"] < 0.5, done.stdout[-2000:]
    assert set(CPUACCT.glob("prorank-suite-*")) <= before, "the run's cgroups were left behind"


def test_without_a_writable_hierarchy_it_refuses_before_any_test(tmp_path, monkeypatch):
    """No cgroup v1 cpuacct (cgroup v2 only, or not root): a usage error naming the path, at configure."""
    monkeypatch.setattr(suite_cpu, "CPUACCT", tmp_path / "cpuacct")
    monkeypatch.delenv(suite_cpu.ROOT_ENV, raising=False)
    config = type("Config", (), {})()  # a controller's config: no `workerinput`
    with pytest.raises(pytest.UsageError, match=re.escape(f"{tmp_path / 'cpuacct'} is not a writable")):
        suite_cpu.pytest_configure(config)
    assert suite_cpu.ROOT_ENV not in os.environ
