"""Weight sync speed, in one script: (a) raw loopback TCP with a plain socket, (b) one gRPC weight transfer
of the model's fp32 weights into a receiver (received, reassembled and checksum-verified), then (c) the
time until 1, 2 and 4 receivers (separate processes) hold a new version.

    .venv/bin/python -m bench.weight_sync --model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import threading
import time

TOKEN = "bench-token"


def raw_tcp_seconds(nbytes: int) -> float:
    payload = memoryview(bytearray(nbytes))
    sink = bytearray(nbytes)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive():
        conn, _ = server.accept()
        view, got = memoryview(sink), 0
        while got < nbytes:
            got += conn.recv_into(view[got:], min(nbytes - got, 1 << 22))
        conn.close()

    thread = threading.Thread(target=receive)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(payload)
    thread.join()
    server.close()
    return time.perf_counter() - start


def _receiver(address: str, min_version: int, ready, go, out) -> None:
    from actors.weight_receiver import fetch_version

    ready.set()
    go.wait()
    start = time.perf_counter()
    manifest, _ = fetch_version(address, TOKEN, min_version, "bench", timeout=600)
    out.put((manifest.version, time.perf_counter() - start))


def fan_out_seconds(address: str, receivers: int, min_version: int) -> float:
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(receivers)]
    procs = [ctx.Process(target=_receiver, args=(address, min_version, r, go, out)) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        r.wait()
    start = time.perf_counter()
    go.set()
    results = [out.get() for _ in procs]
    seconds = time.perf_counter() - start
    for p in procs:
        p.join()
    assert all(v > min_version for v, _ in results)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunk-mb", type=float, default=1)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from actors.weight_receiver import fetch_version
    from learner.weight_server import WeightServer

    state = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).state_dict()
    server = WeightServer(TOKEN, chunk_bytes=int(args.chunk_mb * 2**20)).start()
    try:
        manifest = server.publisher.publish(1, state)
        nbytes = manifest.total_bytes
        raw = min(raw_tcp_seconds(nbytes) for _ in range(2))
        fetch_version(server.address, TOKEN, 0, "warm-up", timeout=600)
        grpc_s = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            fetch_version(server.address, TOKEN, 0, "bench", timeout=600)
            grpc_s = min(grpc_s, time.perf_counter() - start)
        gb = nbytes / 1e9
        print(f"{gb:.3f} GB of fp32 weights, {len(manifest.tensors)} tensors, {args.chunk_mb:g} MiB chunks")
        print(f"(a) raw loopback TCP:  {gb / raw:6.2f} GB/s")
        print(f"(b) gRPC weight fetch: {gb / grpc_s:6.2f} GB/s (received, reassembled, verified)  "
              f"ratio (b)/(a) {raw / grpc_s:.2f}x")
        times = {}
        for n in (1, 2, 4):
            times[n] = fan_out_seconds(server.address, n, 0)
            print(f"(c) {n} receiver(s) hold the new version after {times[n]:.2f}s  "
                  f"ratio vs 1 receiver {times[n] / times[1]:.2f}x", flush=True)
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
