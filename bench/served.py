"""A reward or weight server in a process of its own, from the code at a given tree (the A or the B side of
bench/hostile.py's A/B: PYTHONPATH and the working folder are that tree's root, so it imports its own code)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

TOKEN = "bench-token"
# Runs in the server's process, from either tree: only what both versions of the API have.
SERVE = """
import sys, torch
from prorank.settings.config import RewardConfig
if sys.argv[1] == "reward":
    from prorank.reward.server import RewardServer
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(1000)}
    server = RewardServer(qrels, RewardConfig(port=0), "%s").start()
else:
    from prorank.weights.server import WeightServer
    if sys.argv[1].endswith("-gate"):  # behind the accept layer (this tree only: A has none)
        from prorank.guard.guarded_server import ServerLimits
        server = WeightServer("%s", limits=ServerLimits(max_connections_per_peer=16)).start()
    else:
        server = WeightServer("%s").start()
    size = 2**26 if sys.argv[1].startswith("weights-256mib") else 2**20
    server.publisher.publish(1, {f"w{i}": torch.rand(size // 16) for i in range(16)})
print(server.address, flush=True)
sys.stdin.read()
""" % (TOKEN, TOKEN, TOKEN)


class Served:
    """One server in a process of its own, from the code at `tree`."""

    def __init__(self, tree: Path, kind: str, open_files: int | None = None):
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))) if open_files else None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, kind],
            cwd=tree,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=limit,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None  # both PIPE above
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError(f"the {kind} server from {tree} did not start")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(timeout=30)
