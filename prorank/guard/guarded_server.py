"""The gRPC server both services of ours run on: `grpc.aio` on an event-loop thread of its own, behind a
guard that checks the token in a call's headers before a byte of its body is read.

Why asyncio: a call that waits (for its body, for a version, for a reader that stopped reading) holds no
thread, so no number of open calls takes what other callers need. The thread-pool server this replaced
was frozen by 4 callers that sent headers and never a body: each held a worker thread while the body was
read, before the token check (bench/hostile.py measures both).
Why the token from the headers: a refused call is answered at once, from a handler that never reads the
request, so it holds no handler and its body is never parsed or copied into Python; the few bytes that
reach the server before the refusal sit in the HTTP/2 stream's flow-control window (`stream_window_kb`)
and are dropped with the stream.
Connections are capped per peer host and in total by the accept layer in front of gRPC
(prorank/guard/connection_gate.py), which also holds a connection without an authenticated call to a budget
on the streams it opens and resets (prorank/guard/stream_budget.py: HTTP/2 rapid reset). Authenticated
calls are capped per peer host and in total (RESOURCE_EXHAUSTED beyond, which clients retry). Every refusal
is logged, naming the caller, at most once per peer host and kind per `log_every_seconds`, with a count
(prorank/guard/refusals.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import inspect
import logging
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc

from prorank.guard.connection_gate import ConnectionGate
from prorank.guard.refusals import RefusalLog
from prorank.guard.security import server_credentials
from prorank.guard.stream_budget import BudgetLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one server lets callers hold; the services' configs set these (reward.*, weights.*)."""

    max_calls: int = 256  # authenticated calls in flight, in total
    max_calls_per_peer: int = 64  # authenticated calls in flight from one host
    max_streams_per_connection: int = 128  # HTTP/2 streams one connection may open at once
    stream_window_kb: int = 64  # HTTP/2 flow-control window per stream: the unread bytes a call may send ahead
    log_every_seconds: float = 10.0  # a refusal is logged at most this often per peer host and kind
    handshake_timeout_seconds: float = 5.0  # a connection that has not finished its HTTP/2 handshake is closed
    idle_connection_seconds: float = 10.0  # a connection without a call in flight this long is closed
    max_connections_per_peer: int = 16  # connections one host may hold; 0: no accept layer (gRPC's own)
    max_connections: int = 4096  # connections held in all (with the accept layer)
    budget: BudgetLimits = BudgetLimits()  # a connection without an authenticated call (with the accept layer)

    @classmethod
    def of(cls, cfg) -> ServerLimits:
        """From a service's config section (prorank.settings.service_config.ServiceLimits: reward.*, weights.*)."""
        return cls(
            max_calls=cfg.max_calls,
            max_calls_per_peer=cfg.max_calls_per_peer,
            max_streams_per_connection=cfg.max_streams_per_connection,
            stream_window_kb=cfg.stream_window_kb,
            log_every_seconds=cfg.log_refusals_every_seconds,
            handshake_timeout_seconds=cfg.handshake_timeout_seconds,
            idle_connection_seconds=cfg.idle_connection_seconds,
            max_connections_per_peer=cfg.max_connections_per_peer,
            max_connections=cfg.max_connections,
            budget=BudgetLimits(
                streams=cfg.max_unauthenticated_streams_per_second,
                resets=cfg.max_unauthenticated_resets_per_second,
                resets_total=cfg.max_unauthenticated_resets_per_second_total,
                cooldown_seconds=cfg.abuse_cooldown_seconds,
            ),
        )


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (Go's runtime does the same): at a
    soft 1,024, a common default, 1,000 idle connections from anyone leave no descriptor for a legitimate
    caller. Returns the limit now in force."""

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse: keep what we have
            pass
    return soft


class CallGuard(grpc.aio.ServerInterceptor):
    """The token, from the headers; then the per-peer and total caps on authenticated calls in flight."""

    def __init__(
        self,
        token: str,
        limits: ServerLimits,
        refusals: RefusalLog,
        open_methods: frozenset[str] = frozenset(),
        trust: Callable[[str], None] | None = None,
    ):
        self._expected = f"Bearer {token}".encode()
        self.limits, self.refusals, self._open = limits, refusals, open_methods
        self.trust = trust or (lambda peer: None)  # told the peer of each authenticated call (the gate's budget)
        self.in_flight: dict[str, int] = {}  # peer host -> authenticated calls running (on the loop thread only)
        self.total = 0
        self.calls = 0  # every call seen, refused or not

    async def intercept_service(self, continuation, details):
        self.calls += 1
        handler = await continuation(details)
        if handler is None or details.method in self._open:
            return handler
        supplied = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        supplied = supplied.encode() if isinstance(supplied, str) else supplied
        if not hmac.compare_digest(supplied, self._expected):
            return _refusal(self.refusals, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token", details.method)
        return _counted(handler, self)

    def enter(self, peer: str) -> str | None:
        """Count a call in; why it may not run, or None."""
        host = self.refusals.host(peer)
        if self.total >= self.limits.max_calls:
            return f"{self.total} calls in flight; at most {self.limits.max_calls} (max_calls)"
        if self.in_flight.get(host, 0) >= self.limits.max_calls_per_peer:
            return (
                f"{self.in_flight[host]} calls in flight from {host}; at most "
                f"{self.limits.max_calls_per_peer} (max_calls_per_peer)"
            )
        self.in_flight[host] = self.in_flight.get(host, 0) + 1
        self.total += 1
        return None

    def leave(self, peer: str) -> None:
        host = self.refusals.host(peer)
        self.total -= 1
        if (left := self.in_flight[host] - 1) > 0:
            self.in_flight[host] = left
        else:
            del self.in_flight[host]


def _refusal(refusals: RefusalLog, code: grpc.StatusCode, message: str, method: str):
    # Request-streaming whatever the method is: the handler returns without asking for the request, so
    # its body is never read or parsed (a unary caller cannot tell the difference).
    async def refuse(_requests, context):
        refusals.refused(context.peer(), code.name, f"{method}: {message}")
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _counted(handler, guard: CallGuard):
    """`handler` with its calls counted against the caps (from when its request has arrived). Streaming
    responses must be sent with `await context.write(...)` from a coroutine: a handler that is an async
    generator would have to be wrapped in another, and such nested generators crashed the server (a
    segmentation fault in grpcio 1.85 when the caller leaves mid-stream)."""
    behavior = handler.unary_unary or handler.unary_stream
    if behavior is None:
        return handler  # streaming requests: none of ours
    if inspect.isasyncgenfunction(behavior):
        raise TypeError(f"{behavior.__qualname__}: write the stream with context.write, not yield")

    async def counted(request, context):
        guard.trust(context.peer())
        if problem := guard.enter(context.peer()):
            await guard.refusals.refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
        try:
            return await behavior(request, context)
        finally:
            guard.leave(context.peer())

    make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.unary_stream_rpc_method_handler
    return make(counted, handler.request_deserializer, handler.response_serializer)


async def _cancel_the_rest() -> None:
    """Cancel and await the handler tasks gRPC left behind when it cancelled their calls, so that the loop
    closes with none pending ("Task was destroyed but it is pending!" otherwise)."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)


def return_freed_memory(loop: asyncio.AbstractEventLoop, activity: Callable[[], int], every: float = 2.0) -> None:
    """While the server's loop runs: glibc's malloc_trim every `every` s while the server is busy and for
    `AFTER_ACTIVITY` such spells after (`activity()` counts its calls and socket events). gRPC core frees what
    an attack made it allocate (20 s of oversized header blocks on 64 connections: ~550 MB at peak), but
    glibc keeps the pages: measured, RSS stayed 377 -> 526 MB without this, and went 56 -> 61 MB with it.
    Not while idle: a learner rank holds the weight server, and trimming its heap every 2 s handed back the
    pages its next step's activations were then faulted into again (score steps 11% slower on 2 cores,
    bench/score_step.py against `prorank train`). A thread of its own, not the loop: a trim of a large heap
    takes milliseconds. Not glibc (musl, macOS): nothing to do."""

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    seen, quiet = activity(), AFTER_ACTIVITY
    while not loop.is_closed():
        time.sleep(every)
        now = activity()
        quiet = 0 if now != seen else quiet + 1
        seen = now
        if quiet <= AFTER_ACTIVITY:
            trim(0)


AFTER_ACTIVITY = 5  # trims after the server's last call or socket event: gRPC frees some memory late


class GuardedServer:
    """A `grpc.aio` server on its own event-loop thread. `add_services(server, refusals)` runs on that
    loop (aio servicers belong to it) and registers the handlers; `call_soon(fn)` runs `fn` there from any
    thread."""

    def __init__(
        self,
        add_services: Callable[[grpc.aio.Server, RefusalLog], None],
        token: str,
        host: str,
        port: int,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        limits: ServerLimits = ServerLimits(),
        options: Iterable[tuple[str, object]] = (),
        open_methods: frozenset[str] = frozenset(),
        name: str = "grpc",
    ):
        self.gate = None
        if limits.max_connections_per_peer:
            try:
                self.gate = ConnectionGate(
                    host,
                    port,
                    limits.max_connections_per_peer,
                    limits.max_connections,
                    lambda *refusal: self.refusals.refused(*refusal),
                    limits.budget,
                )
            except OSError as err:  # as gRPC's own bind failure reads
                raise RuntimeError(f"cannot listen on {host}:{port}: {err}") from None
        self.refusals = RefusalLog(limits.log_every_seconds, real_peer=self.gate.real_peer if self.gate else str)
        self.guard = CallGuard(token, limits, self.refusals, open_methods, self.gate.trust if self.gate else None)
        self.loop = asyncio.new_event_loop()
        self._stop_lock = threading.Lock()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-server", daemon=True)
        self._thread.start()
        # Both or neither: the config sections refuse a certificate without its key before any start.
        creds = server_credentials(tls_cert, tls_key or "") if tls_cert else None
        raise_open_file_limit()
        settings = dict(options) | {
            "grpc.so_reuseport": 0,  # a second server on a port in use fails to start instead of sharing it
            "grpc.max_concurrent_streams": limits.max_streams_per_connection,
            "grpc.http2.lookahead_bytes": limits.stream_window_kb * 1024,
            # Connections that never start a call: closed at the handshake's end or after an idle spell.
            "grpc.server_handshake_timeout_ms": int(limits.handshake_timeout_seconds * 1000),
            "grpc.max_connection_idle_ms": int(limits.idle_connection_seconds * 1000),
        }

        async def build() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(interceptors=[self.guard], options=list(settings.items()))
            add_services(server, self.refusals)
            target = self.gate.backend_address if self.gate else f"{host}:{port}"
            return server, server.add_secure_port(target, creds) if creds else server.add_insecure_port(target)

        try:
            self.server, self.port = self.run(build())
        except BaseException:
            self._close_loop()
            raise
        if self.gate:
            self.port = self.gate.port

    def run(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits
            pass

    def start(self) -> None:
        try:
            self.run(self.server.start())
            if self.gate:
                self.gate.start()
        except BaseException:
            self._close_loop()
            raise
        trimmer = threading.Thread(
            target=return_freed_memory, args=(self.loop, self.activity), name="malloc-trim", daemon=True
        )
        trimmer.start()

    def activity(self) -> int:
        """A count that grows with every call and (behind the connection gate) every socket event."""
        return self.guard.calls + (self.gate.events if self.gate else 0)

    def stop(self, grace: float | None, first: Callable[[], Awaitable] | None = None) -> None:
        """New calls are refused at once; calls in flight get `grace` seconds, then are cancelled. `first`
        (a coroutine function, e.g. health's graceful shutdown) runs on the loop before that. Safe from
        several threads: a second caller waits for the first stop to end (a coroutine handed to a loop
        that the first stop is closing would never run: its caller waited out the 60 s timeout)."""
        with self._stop_lock:
            if self.loop.is_closed():
                return
            try:
                if first is not None:
                    self.run(first())
                self.run(self.server.stop(grace), timeout=None if grace is None else grace + 30)
                self.run(_cancel_the_rest(), timeout=30)
            finally:
                self._close_loop()

    def wait(self) -> None:
        self._thread.join()

    def _close_loop(self) -> None:
        if self.gate:
            self.gate.stop()
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        if not self.loop.is_running():
            self.loop.close()
