"""gRPC core's own log lines folded (prorank/guard/grpc_core_log.py): the first of a kind as written, the rest
counted in one line; every other line passed on at once, a fatal traceback included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = (
    "E1203 22:05:04.{i:06d}   23448 hpack_encoder.cc:618] Ignoring key value pair due to size limit. "
    "Current buffer size: {i} new key value size: 119035\n"
)


def run(body: str) -> subprocess.CompletedProcess:
    code = (
        "import os, sys; from prorank.guard.grpc_core_log import fold_grpc_core_lines; fold_grpc_core_lines(60)\n"
        + body
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_core_lines_are_folded_and_other_lines_pass():
    done = run(
        f"for i in range(500): os.write(2, {CORE!r}.format(i=i).encode())\n"
        "print('refused a call from ipv4:10.0.0.9, UNAUTHENTICATED', file=sys.stderr)\n"
        "os.write(2, b'I1203 22:05:05.1 23448 chttp2_transport.cc:1403] Got goaway\\n')\n"
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and len(lines) == 4, lines  # the goaway kind came once: no count line
    assert lines[0].startswith("E1203 22:05:04.000000") and "buffer size: 0 new" in lines[0]
    assert lines[1] == "refused a call from ipv4:10.0.0.9, UNAUTHENTICATED"
    assert lines[2].endswith("chttp2_transport.cc:1403] Got goaway")
    assert lines[3].startswith(
        "gRPC core: 499 more line(s) like 'hpack_encoder.cc: Ignoring key value pair due "
        "to size limit. Current buffer size: # new key value size: #"
    ), lines[3]


def test_a_fatal_error_reaches_the_terminal():
    done = run("raise RuntimeError('the last words')\n")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: the last words" in done.stderr, done.stderr
