"""One weight-sync peer, run inside a node of the simulated cluster (bench/fanout.py,
tests/integration/test_simcluster.py).

    python -m deploy.sim.weight_peer serve --host IP --model DIR|--size-mb N   (the learner's server)
    python -m deploy.sim.weight_peer pull --name R [--relay-host IP]           (an actor's receiver)

The code paths are the job's: `WeightServer` publishing a version, and `pull_newest` (the receiver's
fallback from the relay before it to the learner) with the actor's own relay server. A peer speaks
JSON lines: `serve` prints {"address"} once published and serves until stdin closes; `pull` prints
{"relay"} (its relay's address, or ""), then reads one line {"sources": [[address, seconds], ...]},
pulls, prints {"version", "source", "bytes", "done": wall clock} and keeps relaying until stdin closes.
Token and TLS come from --token-file / --tls-cert/--tls-key (servers) and --tls-ca (receivers).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

from prorank.guard.security import load_token


def answer(proc, timeout: float = 600.0) -> dict:
    """The next JSON line a peer process (text stdout pipe) prints; other lines are skipped. An error
    if the peer exits first or says nothing for `timeout` seconds."""
    lines = getattr(proc, "prorank_lines", None)
    if lines is None:  # a reader thread, so that the wait is bounded
        lines = proc.prorank_lines = queue.Queue()

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(f"peer exited ({proc.wait()}) without answering")
        if line.startswith("{"):
            return json.loads(line)
    raise TimeoutError(f"no answer from a peer in {timeout:.0f} s")


def order(proc, sources: list[list]) -> None:
    """Tell a waiting `pull` peer where to pull from: [[address, seconds], ...] in order of preference."""
    proc.stdin.write(json.dumps({"sources": sources}) + "\n")
    proc.stdin.flush()


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _state(model: str | None, size_mb: float) -> dict:
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

    if model:
        from safetensors.torch import load_file  # noqa: PLC0415 safetensors.torch imports torch

        state = {}
        for path in sorted(Path(model).glob("*.safetensors")):
            state.update(load_file(path))
        return state
    n = int(size_mb * 2**20 / 4 / 8)
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(n, generator=generator) for i in range(8)}


def serve(args) -> None:
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not

    server = WeightServer(args.token, host=args.host, tls_cert=args.tls_cert, tls_key=args.tls_key).start()
    manifest = server.publisher.publish(args.version, _state(args.model, args.size_mb)).manifest
    _say(address=server.address, bytes=manifest.total_bytes)
    sys.stdin.read()  # until the orchestrator closes our stdin
    server.stop(0)


def pull(args) -> None:
    from prorank.weights.receiver import pull_newest  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not

    relay = (
        WeightServer(args.token, host=args.relay_host, tls_cert=args.tls_cert, tls_key=args.tls_key).start()
        if args.relay_host
        else None
    )
    _say(relay=relay.address if relay else "")
    order = json.loads(sys.stdin.readline())
    got, source = pull_newest(
        [tuple(s) for s in order["sources"]],
        args.token,
        0,
        args.name,
        tls_ca=args.tls_ca,
        relay=relay.publisher if relay else None,
    )
    manifest = got[0] if got else None
    _say(
        version=manifest.version if manifest else 0,
        source=source,
        done=time.time(),
        bytes=manifest.total_bytes if manifest else 0,
    )
    sys.stdin.read()
    if relay:
        relay.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["serve", "pull"])
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--relay-host", default="")
    parser.add_argument("--name", default="peer")
    parser.add_argument("--model")
    parser.add_argument("--size-mb", type=float, default=64)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca")
    args = parser.parse_args()

    args.token = load_token(args.token_file)
    serve(args) if args.role == "serve" else pull(args)


if __name__ == "__main__":
    main()
