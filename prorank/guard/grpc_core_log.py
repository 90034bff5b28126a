"""gRPC core's own log lines, folded: the first of a kind in each interval as written, the rest counted
into one line at the interval's end, beside our refusal log.

Why: gRPC core (C++) writes straight to file descriptor 2, past Python's logging. Under a flood of header
blocks past its metadata limit it wrote a line per few hundred refused calls here (77 in 20 s), and
12,826 lines (2.4 MB) in 20 s in the measurement that opened issue 34.
Why a child process: it owns the reading end of a pipe that replaces fd 2, and passes every other line
through at once. When this process dies, even of a fatal error, the child still reads the last lines
(a thread would die with it and lose the traceback). It runs in a session of its own and ignores SIGINT
and SIGTERM, so a stop sent to the job leaves it to drain and exit at end of file.
"""

from __future__ import annotations

import os
import subprocess
import sys

_FOLD = r"""
import os, re, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
every, out, src = float(sys.argv[1]), sys.stdout.buffer, sys.stdin.buffer
core = re.compile(rb"^[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] (.*)")
seen, start = {}, time.monotonic()  # (file, message shape) -> lines held back this interval

def flush():
    for (where, shape), n in seen.items():
        if n:
            out.write(b"gRPC core: %d more line(s) like '%s: %s' in the last %gs\n" % (n, where, shape[:160], every))
    seen.clear()
    out.flush()

while True:
    if not select.select([src], [], [], max(0.0, start + every - time.monotonic()))[0]:
        flush(); start = time.monotonic(); continue
    line = src.readline()
    if not line:
        break
    match = core.match(line)
    if match:
        key = (match[1], re.sub(rb"\d+", b"#", match[2]))
        if key in seen:
            seen[key] += 1
            continue
        seen[key] = 0
    out.write(line); out.flush()
    if time.monotonic() - start >= every:
        flush(); start = time.monotonic()
flush()
"""


def fold_grpc_core_lines(every: float) -> subprocess.Popen | None:
    """From now on, this process's file descriptor 2 goes through the folding child (see above), which
    counts held-back lines per `every` seconds (a service's `log_refusals_every_seconds`; 0, which logs
    every refusal, folds per 10 s: the child's wait would spin at 0). Returns the child, or None where
    this process has no fd 2 (nothing changes then)."""
    every = every or 10.0
    try:
        os.fstat(2)
    except OSError:
        return None
    sys.stderr.flush()
    original = os.dup(2)
    try:  # a session of its own: a signal to our process group (Ctrl-C, a scheduler's stop) leaves it be
        child = subprocess.Popen(
            [sys.executable, "-c", _FOLD, str(every)],
            stdin=subprocess.PIPE,
            stdout=original,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(original)
    assert child.stdin is not None  # stdin=PIPE above
    os.dup2(child.stdin.fileno(), 2)
    return child
