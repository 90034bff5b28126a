"""Weight sync to 1, 2 and 4 actors on separate nodes, star vs relay, over shaped links (needs root).

Brings up a simulated cluster (deploy/sim: one network namespace per node, every link shaped with tc to
--rate each way), runs the learner's weight server on node 0 and one receiver per actor node, and times
from "go" until every receiver holds the verified version. Star: every actor pulls from the learner, so
the learner's link carries one copy per actor. Relay: each actor pulls from the one before it, which
passes chunks on while it receives (what `weights.relay: true` does in a job). Beside each figure: the
link-limited lower bound, weight bytes / link rate. Token and TLS on, as on a cluster.

    sudo .venv/bin/python -m bench.fanout --model models/SmolLM2-135M-Instruct --rate 800mbit
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from deploy.sim.cluster import ROOT, SimCluster
from deploy.sim.netns import can_create_namespaces
from deploy.sim.weight_peer import answer, order


def rate_bits(rate: str) -> float:
    """tc's rate units (SI: 1mbit = 10^6 bit/s)."""
    m = re.fullmatch(r"([\d.]+)(bit|kbit|mbit|gbit)", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: use bit, kbit, mbit or gbit")
    return float(m[1]) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m[2]]


def sync_seconds(cluster: SimCluster, learner: str, actors: int, relay: bool) -> tuple[float, list[str]]:
    """Seconds from go until `actors` receivers (nodes 1..actors) hold the version; their sources."""
    common = [
        sys.executable,
        "-m",
        "deploy.sim.weight_peer",
        "pull",
        "--token-file",
        str(cluster.token_file),
        "--tls-cert",
        str(cluster.cert),
        "--tls-key",
        str(cluster.key),
        "--tls-ca",
        str(cluster.cert),
    ]
    peers = []
    try:
        for i in range(1, actors + 1):
            node = cluster.nodes[i]
            argv = [*common, "--name", f"actor{i}", *(["--relay-host", node.ip] if relay else [])]
            peers.append(cluster.popen(node, argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        relays = [answer(p)["relay"] for p in peers]
        go = time.time()
        for i, peer in enumerate(peers):
            order(peer, ([[relays[i - 1], 600]] if relay and i else []) + [[learner, 600]])
        done = [answer(p) for p in peers]
    finally:
        for peer in peers:
            if peer.stdin:
                peer.stdin.close()
            peer.wait(60)
    if any(d["version"] != 1 for d in done):
        raise RuntimeError(f"a receiver did not get the version: {done}")
    return max(d["done"] for d in done) - go, [d["source"] for d in done]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (its safetensors are sent); else --size-mb random")
    parser.add_argument("--size-mb", type=float, default=256)
    parser.add_argument("--rate", default="800mbit")
    parser.add_argument("--actors", default="1,2,4")
    parser.add_argument("--name", default="prkfan")
    args = parser.parse_args()
    if why := can_create_namespaces():
        sys.exit(f"bench.fanout needs network namespaces: {why}")
    counts = [int(x) for x in args.actors.split(",")]
    cluster = SimCluster(args.name, ["learner"] + ["actor"] * max(counts), subnet=79, rate=args.rate, delay="")
    cluster.up(ray=False)
    server = None
    try:
        argv = [
            sys.executable,
            "-m",
            "deploy.sim.weight_peer",
            "serve",
            "--host",
            cluster.head.ip,
            "--token-file",
            str(cluster.token_file),
            "--tls-cert",
            str(cluster.cert),
            "--tls-key",
            str(cluster.key),
        ]
        argv += ["--model", args.model] if args.model else ["--size-mb", str(args.size_mb)]
        server = cluster.popen(0, argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        published = answer(server)
        nbytes = published["bytes"]
        bound = nbytes * 8 / rate_bits(args.rate)
        print(
            f"{nbytes / 1e6:.1f} MB of weights, links {args.rate} each way (tc tbf), TLS + token; "
            f"lower bound (bytes / link rate) {bound:.2f} s"
        )
        print("| actors | star s | star / bound | relay s | relay / bound | relay / relay(1) |")
        print("|---|---|---|---|---|---|")
        first_relay = None
        for n in counts:
            star, _ = sync_seconds(cluster, published["address"], n, relay=False)
            relay, sources = sync_seconds(cluster, published["address"], n, relay=True)
            first_relay = first_relay or relay
            if sources[1:] and published["address"] in sources[1:]:  # a relay hop fell back: not a relay figure
                raise RuntimeError(f"relay run fell back to the learner: {sources}")
            print(
                f"| {n} | {star:.2f} | {star / bound:.2f}x | {relay:.2f} | {relay / bound:.2f}x | "
                f"{relay / first_relay:.2f}x |",
                flush=True,
            )
    finally:
        if server and server.stdin:
            server.stdin.close()
            server.wait(60)
        cluster.down()


if __name__ == "__main__":
    main()
