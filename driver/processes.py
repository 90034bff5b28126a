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


def descendants(spare: frozenset[psutil.Process] = frozenset()) -> list[psutil.Process]:
    """This process's descendants, but those in `spare` and theirs (a caller's Ray started the job's
    workers under its own raylet: they are that Ray's). A psutil.Process equals another only with the same
    pid and start time, so a reused pid is not spared."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process not in spare and not spare.intersection(process.parents()):
                found.append(process)
        except psutil.Error:  # ended meanwhile
            pass
    return found


def end_descendants(
    grace: float = 30.0, term_wait: float = 10.0, spare: frozenset[psutil.Process] = frozenset()
) -> list[str]:
    """Wait up to `grace` s for every descendant of this process but `spare` (those it had before the
    command: a caller's Ray, a test's servers) to end, reaping them; then SIGTERM those left and SIGKILL
    those still there after `term_wait` s. Returns the ones alive after all that, named."""
    deadline = time.monotonic() + grace
    while (left := descendants(spare)) and time.monotonic() < deadline:
        psutil.wait_procs(left, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
    for signal_them in (psutil.Process.terminate, psutil.Process.kill):
        if not (left := descendants(spare)):
            return []
        names = ", ".join(map(describe, left))
        log.warning("%d process(es) still running; %s: %s", len(left), signal_them.__name__, names)
        for process in left:
            try:
                signal_them(process)
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=term_wait)
    return [describe(p) for p in descendants(spare)]


@contextmanager
def ending_descendants(grace: float = 10.0) -> Iterator[None]:
    """Around a command: adopt its orphans; at its end, however it ends, end the descendants it started
    (`end_descendants`; those this process had before are left alone) and say on stderr which, if any,
    could not be ended."""
    before = frozenset(descendants())
    adopt_orphans()
    try:
        yield
    finally:
        if left := end_descendants(grace, spare=before):
            print(f"could not end {len(left)} process(es) this command started: {', '.join(left)}", file=sys.stderr)
