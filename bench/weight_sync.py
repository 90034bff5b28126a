"""Weight sync speed, in one script: (a) raw loopback TCP with a plain socket, (b) one gRPC weight transfer
of the model's fp32 weights into a receiver (received, reassembled and checksum-verified), then (c) the
time until 1, 2 and 4 receivers (separate processes) hold a new version: all pulling from the learner
(star) or each from the one before (pipeline relay). With --actors, (d) the same through live vLLM actors
(`ActorPool.sync_weights`): from publish to "every actor serves it".

    .venv/bin/python -m bench.weight_sync --model models/SmolLM2-135M-Instruct [--actors 1,2,4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import threading
import time

import grpc

from prorank.guard.security import auth_metadata
from prorank.protocol import weights_pb2
from prorank.settings.config import ActorConfig, PromptConfig, SamplingConfig, WeightSyncConfig

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


def grpc_ceiling_seconds(address: str) -> float:
    """The same stream with nothing done to the messages: what Python gRPC carries at best."""

    from prorank.weights.codec import CHANNEL_OPTIONS  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import SERVICE  # noqa: PLC0415 pulls torch, which importing this module does not

    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        fetch = channel.unary_stream(f"/{SERVICE}/Fetch", request_serializer=weights_pb2.FetchRequest.SerializeToString)
        start = time.perf_counter()
        for _ in fetch(weights_pb2.FetchRequest(min_version=0), metadata=auth_metadata(TOKEN), timeout=600):
            pass
        return time.perf_counter() - start


def _receiver(upstream, relay: bool, addresses, go, out) -> None:
    from prorank.weights.receiver import fetch_version  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not

    server = WeightServer(TOKEN).start() if relay else None
    addresses.put(server.address if server else "")
    source = upstream.get()
    go.wait()
    manifest, _ = fetch_version(source, TOKEN, 0, "bench", timeout=600, relay=server.publisher if server else None)
    out.put((manifest.version, time.perf_counter()))
    upstream.get()  # stay up (serving downstream) until told to go
    if server:
        server.stop(0)


def fan_out_seconds(address: str, receivers: int, pipeline: bool) -> float:
    """Seconds from go until every receiver holds the version (star: all pull from `address`)."""
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    upstreams = [ctx.Queue() for _ in range(receivers)]
    addresses = [ctx.Queue() for _ in range(receivers)]
    procs = [
        ctx.Process(target=_receiver, args=(upstreams[i], pipeline, addresses[i], go, out)) for i in range(receivers)
    ]
    for p in procs:
        p.start()
    relays = [q.get() for q in addresses]
    for i, q in enumerate(upstreams):
        q.put(relays[i - 1] if pipeline and i else address)
    time.sleep(0.5)
    start = time.perf_counter()
    go.set()
    results = [out.get() for _ in procs]
    seconds = max(t for _, t in results) - start
    for q in upstreams:
        q.put("done")
    for p in procs:
        p.join()
    assert all(v > 0 for v, _ in results)
    return seconds


def actors_seconds(model: str, state, counts: list[int]) -> None:
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    from prorank.actors.pool import ActorPool  # noqa: PLC0415 pulls ray, torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.transport import GrpcTransport  # noqa: PLC0415 pulls torch, which importing this module does not

    ray.init(num_cpus=max(counts) + 1, include_dashboard=False, log_to_driver=False)
    server = WeightServer(TOKEN).start()
    version = 0
    # Versions alternate between two states that differ in every tensor: each sync sends the whole model
    # (an unchanged tensor would not be sent again).
    states = (state, {k: v + 1 for k, v in state.items()})
    try:
        for n in counts:
            for relay in (False, True):
                cfg = ActorConfig(num_actors=n, num_cpus=1, max_model_len=512, kv_cache_gib=1)
                receivers = GrpcTransport(TOKEN, WeightSyncConfig(relay=relay, wait_seconds=600)).receiver
                pool = ActorPool(model, cfg, SamplingConfig(), PromptConfig(), receivers).start()
                seconds = []
                for _ in range(2):
                    version += 1
                    start = time.perf_counter()
                    server.publisher.publish(version, states[version % 2])
                    answers = pool.sync_weights(server.address)
                    seconds.append(time.perf_counter() - start)
                    assert all(a["applied"] for a in answers.values()), answers
                pool.shutdown()
                print(
                    f"(d) {n} vLLM actor(s) serve the new version, {'pipeline' if relay else 'star'}: "
                    f"{min(seconds):.2f}s (publish + transfer + load)",
                    flush=True,
                )
    finally:
        server.stop(0)
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunk-mb", type=float, default=1)
    ap.add_argument("--actors", default="", help="comma-separated vLLM actor counts for (d), e.g. 1,2,4")
    args = ap.parse_args()

    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.weights.receiver import fetch_version  # noqa: PLC0415 pulls torch, which importing this module does not
    from prorank.weights.server import WeightServer  # noqa: PLC0415 pulls torch, which importing this module does not

    state = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).state_dict()
    server = WeightServer(TOKEN, chunk_bytes=int(args.chunk_mb * 2**20)).start()
    try:
        manifest = server.publisher.publish(1, state).manifest
        nbytes, gb = manifest.total_bytes, manifest.total_bytes / 1e9
        raw = min(raw_tcp_seconds(nbytes) for _ in range(2))
        start = time.perf_counter()
        _, blob = fetch_version(server.address, TOKEN, 0, "warm-up", timeout=600)
        first_s = time.perf_counter() - start
        ceiling = min(grpc_ceiling_seconds(server.address) for _ in range(2))
        grpc_s = float("inf")
        for _ in range(3):  # steady state: an actor receives each version into the last one's buffer
            start = time.perf_counter()
            fetch_version(server.address, TOKEN, 0, "bench", timeout=600, buffer=blob)
            grpc_s = min(grpc_s, time.perf_counter() - start)
        print(f"{gb:.3f} GB of fp32 weights, {len(manifest.tensors)} tensors, {args.chunk_mb:g} MiB chunks")
        print(f"(a) raw loopback TCP:  {gb / raw:6.2f} GB/s")
        print(
            f"(b) gRPC weight fetch: {gb / grpc_s:6.2f} GB/s (received, reassembled, verified)  "
            f"ratio (b)/(a) {raw / grpc_s:.2f}x"
        )
        print(
            f"    the same into a new buffer (an actor's first sync): {gb / first_s:6.2f} GB/s  "
            f"ratio {raw / first_s:.2f}x of (a)"
        )
        print(f"    gRPC stream, messages dropped unread: {gb / ceiling:6.2f} GB/s  ratio {raw / ceiling:.2f}x of (a)")
        for pipeline in (False, True):
            times = {}
            for n in (1, 2, 4):
                times[n] = fan_out_seconds(server.address, n, pipeline)
                print(
                    f"(c) {n} receiver(s), {'pipeline' if pipeline else 'star'}: all hold the version after "
                    f"{times[n]:.2f}s  ratio vs 1 receiver {times[n] / times[1]:.2f}x",
                    flush=True,
                )
    finally:
        server.stop(0)
    if args.actors:
        actors_seconds(args.model, state, [int(n) for n in args.actors.split(",")])


if __name__ == "__main__":
    main()
