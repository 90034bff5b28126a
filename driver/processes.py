"""A command that starts processes ends only after all of them have: `prorank train` and `prorank synthesize`
start a local Ray (its GCS, raylet and workers), and through it the actors' vLLM engines, the learner
ranks and the reward replicas. `ray.shutdown()` returns before those have exited: a finished job's vLLM
engine was seen alive 30 s after the job exited 0 (issue 47), holding memory and cores a next job needs.

How: the command becomes the subreaper of its descendants (Linux's PR_SET_CHILD_SUBREAPER), so a process
whose parent ended first (a worker whose raylet went) is re-parented to it rather than to init, and is
still found among its descendants at the end. Then `end_descendants` waits for them, and sends SIGTERM,
then SIGKILL, to those that outlast the grace; any it could not end is named.
With a Ray cluster (`train.ray_address`) the actors live on the cluster's nodes: Ray ends them with the
job, and only this machine's processes are ours to wait for.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def adopt_orphans() -> bool:
    """Make this process the subreaper of its descendants; False where the system has no such thing."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid} ({' '.join(process.cmdline())[:100] or process.name()})"
    except psutil.Error:
        return f"pid {process.pid}"


def end_descendants(grace: float = 30.0, term_wait: float = 10.0) -> list[str]:
    """Wait up to `grace` s for every descendant of this process to end (reaping them), then SIGTERM those
    left and SIGKILL those still there after `term_wait` s; returns the ones alive after all that, named."""
    me = psutil.Process()
    deadline = time.monotonic() + grace
    while (left := me.children(recursive=True)) and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
    for signal_them in (psutil.Process.terminate, psutil.Process.kill):
        if not (left := me.children(recursive=True)):
            return []
        names = ", ".join(map(describe, left))
        log.warning("%d process(es) still running; %s: %s", len(left), signal_them.__name__, names)
        for process in left:
            try:
                signal_them(process)
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=term_wait)
    return [describe(p) for p in me.children(recursive=True)]


@contextmanager
def ending_descendants(grace: float = 10.0) -> Iterator[None]:
    """Around a command: adopt its orphans; at its end, however it ends, end its descendants
    (`end_descendants`) and say on stderr which, if any, could not be ended."""
    adopt_orphans()
    try:
        yield
    finally:
        if left := end_descendants(grace):
            print(f"could not end {len(left)} process(es) this command started: {', '.join(left)}", file=sys.stderr)
