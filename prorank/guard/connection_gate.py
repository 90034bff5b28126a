"""The accept layer in front of our gRPC servers: it caps the connections one peer host (and everyone
together) may hold, then relays each connection it keeps to the gRPC server behind it, holding a connection
without an authenticated call to a budget on the streams it opens and resets (prorank/guard/stream_budget.py).

Why: gRPC has no per-peer connection limit, and a few hosts with many connections are what floods
need. Measured on 2 cores (issue 34; BENCHMARKS.md): 20 s of header blocks past gRPC's metadata limit,
sent back to back, failed legitimate calls on 32-64 connections and held on 4; HTTP/2 rapid reset the same
way. One host gets `max_per_host` connections; the next is reset at once and counted in our refusal log.
Why a relay and not a check after gRPC's accept: grpcio cannot be handed an accepted socket. The gRPC
server listens on a Unix socket in a private folder (mode 0700: no one else can skip the gate), and each
relayed connection comes from an abstract Unix address of its own, so that the server can map
`context.peer()` back to the real caller with `real_peer`. Bytes pass through unread (TLS included) and
uncopied: one thread with an epoll selector moves them with `os.splice` through a pipe each way (made at a
direction's first byte), so a caller that never reads holds at most one pipe (1 MiB) of kernel memory here.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import selectors
import shutil
import socket
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import cast

from prorank.guard.stream_budget import BudgetLimits, FrameCounter, StreamBudget

log = logging.getLogger(__name__)

PIPE_BYTES = 1024 * 1024  # what a pipe between the two sockets holds (F_SETPIPE_SZ)
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
PEEK = 65536  # the most bytes read at once from a connection whose frames are counted
RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends RST at once
RECENT_PEERS = 4096  # closed connections whose caller is still named (a refusal logged after the close)


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.5:41234' -> 'ipv4:10.0.0.5': the caller's host (its port changes per connection)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _uri(family: int, address) -> str:
    """A socket address as gRPC writes a peer: 'ipv4:10.0.0.5:41234', 'ipv6:[::1]:41234'."""
    if family == socket.AF_INET6:
        return f"ipv6:[{address[0]}]:{address[1]}"
    return f"ipv4:{address[0]}:{address[1]}"


class _Relay:
    """One kept connection: the caller's socket and ours to the gRPC server, and a pipe each way that holds
    what one side sent until the other takes it (the kernel moves the bytes: `os.splice`, no copy here)."""

    def __init__(self, outer: socket.socket, inner: socket.socket, host: str, name: str, frames: FrameCounter | None):
        self.outer, self.inner, self.host, self.name = outer, inner, host, name
        self.frames = frames  # counted until an authenticated call (None: trusted, or no budget)
        self.pipes: dict[socket.socket, tuple[int, int]] = {}  # from this socket: (read end, write end)
        self.pending = {outer: 0, inner: 0}  # bytes read from this socket, in its pipe, not yet written on
        self.eof = {outer: False, inner: False}

    def other(self, sock: socket.socket) -> socket.socket:
        return self.inner if sock is self.outer else self.outer

    def pipe(self, sock: socket.socket) -> tuple[int, int]:
        """The pipe for what `sock` sends, made at its first byte (an idle connection holds none)."""
        if sock not in self.pipes:
            read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # over /proc/sys/fs/pipe-max-size for this user: the default 64 KiB
                pass
            self.pipes[sock] = (read, write)
        return self.pipes[sock]

    def events(self, sock: socket.socket) -> int:
        """What to wait for on `sock`: readable while what it sent is passed on, writable while the other
        side's bytes wait for it."""
        mask = 0 if self.eof[sock] or self.pending[sock] else selectors.EVENT_READ
        return mask | (selectors.EVENT_WRITE if self.pending[self.other(sock)] else 0)

    def close(self) -> None:
        for read, write in self.pipes.values():
            os.close(read)
            os.close(write)
        self.pipes.clear()


class ConnectionGate:
    """Listens on (host, port) for TCP, keeps at most `max_per_host` connections per peer host and
    `max_total` in all, and relays the kept ones to the Unix socket `backend` (see `backend_address`).
    `refused(peer, kind, detail)` hears of each refused or closed connection (our RefusalLog). With
    `budget`, a connection is held to it until `trust` names it."""

    def __init__(
        self,
        host: str,
        port: int,
        max_per_host: int,
        max_total: int,
        refused: Callable[[str, str, str], None],
        budget: BudgetLimits | None = None,
    ):
        self.max_per_host, self.max_total, self._refused = max_per_host, max_total, refused
        self.budget = StreamBudget(budget) if budget else None
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.create_server(address[:2], family=family, backlog=1024)  # a port in use: here
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        _remove_folders_of_dead_servers()
        # 0700: only this user reaches the backend. The pid in its name lets a later gate remove it when
        # this process was killed before its stop() (a test's kill, the OOM killer).
        self._folder = tempfile.mkdtemp(prefix=f"prorank-gate-{os.getpid()}-")
        self.backend = os.path.join(self._folder, "grpc.sock")
        self._names = (f"prorank-gate-{os.getpid()}-{id(self):x}-{n}" for n in itertools.count())
        self._peers: dict[str, str] = {}  # 'unix-abstract:<name>' -> the caller's peer, read by gRPC's threads
        self._recent: OrderedDict[str, str] = OrderedDict()  # the same, for the last RECENT_PEERS closed
        self._by_name: dict[str, _Relay] = {}  # each relay once, by its name
        self._per_host: dict[str, int] = {}
        self._relays: dict[socket.socket, _Relay] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self.events = 0  # accepts and socket reads/writes handled
        self._thread = threading.Thread(target=self._serve, name=f"gate-{self.port}", daemon=True)

    @property
    def backend_address(self) -> str:
        """Where the gRPC server behind the gate listens (an `add_*_port` target)."""
        return f"unix:{self.backend}"

    def real_peer(self, peer: str) -> str:
        """gRPC's `context.peer()` of a relayed call -> the caller's own ('ipv4:10.0.0.5:41234'), also
        for a connection closed since (a refusal is often logged after its caller has gone)."""
        return self._peers.get(peer) or self._recent.get(peer, peer)

    def trust(self, peer: str) -> None:
        """The connection of gRPC's `peer` carried an authenticated call: no budget for it from now on.
        From any thread (the relay's counter is dropped, not changed)."""
        if (relay := self._by_name.get(peer)) is not None:
            relay.frames = None

    @property
    def connections(self) -> int:
        return len(self._relays) // 2

    def start(self) -> ConnectionGate:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for relay in list(self._by_name.values()):
            self._close(relay)
        self._selector.close()
        self._listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._selector.select(timeout=0.5):
                self.events += 1  # read by the server's memory trimmer: is anyone there?
                if key.fileobj is self._listener:
                    self._accept_all()
                elif (relay := self._relays.get(cast(socket.socket, key.fileobj))) is not None:
                    self._pump(relay, cast(socket.socket, key.fileobj), mask)

    def _accept_all(self) -> None:
        while True:
            try:
                outer, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of file descriptors: the caller stays in the backlog
                log.warning("connection gate on port %d: accept failed: %s", self.port, err)
                return
            self._admit(outer, _uri(outer.family, address))

    def _admit(self, outer: socket.socket, peer: str) -> None:
        host = peer_host(peer)
        held = self._per_host.get(host, 0)
        cooling = self.budget.cooling_left(host) if self.budget else 0.0
        problem = (
            f"{host} went past the unauthenticated budget; its connections are refused for {cooling:.1f} s more "
            "(abuse_cooldown_seconds)"
            if cooling
            else f"{held} connections from {host}; at most {self.max_per_host} (max_connections_per_peer)"
            if held >= self.max_per_host
            else f"{self.connections} connections; at most {self.max_total} (max_connections)"
            if self.connections >= self.max_total
            else None
        )
        inner = None
        if problem is None:
            name = next(self._names)
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                inner.bind(f"\0{name}")
                inner.settimeout(2.0)  # the gRPC server accepts in microseconds; a full backlog is a refusal
                inner.connect(self.backend)
            except OSError as err:
                inner.close()
                inner, problem = None, f"the gRPC server behind the gate did not accept: {err}"
        if problem is not None or inner is None:
            outer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            outer.close()
            self._refused(peer, "CONNECTION", problem or "the gRPC server behind the gate did not accept")
            return
        outer.setblocking(False)
        inner.setblocking(False)
        outer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relay = _Relay(outer, inner, host, f"unix-abstract:{name}", FrameCounter() if self.budget else None)
        self._peers[relay.name] = peer
        self._by_name[relay.name] = relay
        self._per_host[host] = held + 1
        for sock in (outer, inner):
            self._relays[sock] = relay
            self._selector.register(sock, selectors.EVENT_READ)

    def _pump(self, relay: _Relay, sock: socket.socket, mask: int) -> None:
        other = relay.other(sock)
        try:
            if mask & selectors.EVENT_WRITE and relay.pending[other]:  # `sock` can take what `other` sent
                relay.pending[other] -= _splice(relay.pipe(other)[0], sock.fileno(), relay.pending[other])
                if not relay.pending[other] and relay.eof[other]:
                    sock.shutdown(socket.SHUT_WR)
            if mask & selectors.EVENT_READ and not relay.pending[sock]:
                read, write = relay.pipe(sock)
                limit = PIPE_BYTES
                if sock is relay.outer and (frames := relay.frames) is not None and frames.parsing:
                    try:
                        peeked = sock.recv(PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):  # woken for nothing
                        peeked = b""
                    if peeked and self.budget and (problem := self.budget.charge(frames, peeked)):
                        self._expel(relay, problem)
                        return
                    limit = len(peeked) or PIPE_BYTES  # exactly what was counted (none: its end of file)
                try:
                    n = os.splice(sock.fileno(), write, limit, flags=SPLICE)
                except (BlockingIOError, InterruptedError):  # woken for nothing
                    n = None
                if n == 0:
                    relay.eof[sock] = True
                    other.shutdown(socket.SHUT_WR)
                elif n:
                    relay.pending[sock] = n - _splice(read, other.fileno(), n)
        except OSError:  # reset, broken pipe: the connection is over both ways
            self._close(relay)
            return
        if all(relay.eof.values()):
            self._close(relay)
            return
        for s in (relay.outer, relay.inner):
            self._watch(s, relay.events(s))

    def _expel(self, relay: _Relay, problem: str) -> None:
        """`relay`'s caller went past the budget: close it (RST), with its host's other connections still
        without an authenticated call, and refuse the host's new ones for the cooldown."""
        assert self.budget is not None  # only a budgeted connection is charged
        self.budget.cool_down(relay.host)
        peer = self._peers.get(relay.name, relay.host)
        expelled = [r for r in self._by_name.values() if r is relay or (r.host == relay.host and r.frames is not None)]
        for r in expelled:
            r.outer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            self._close(r)
        cooldown = self.budget.limits.cooldown_seconds
        self._refused(
            peer,
            "BUDGET",
            f"{problem}; closed {len(expelled)} unauthenticated connection(s) of {relay.host}, whose new connections "
            f"are refused for {cooldown:g} s (abuse_cooldown_seconds)",
        )

    def _watch(self, sock: socket.socket, events: int) -> None:
        """Wait for `events` on `sock`; none (its caller has finished sending and nothing waits for it):
        out of the selector, or a socket at its end of file would wake it forever."""
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            key = None
        if events and key is None:
            self._selector.register(sock, events)
        elif events and key is not None and key.events != events:
            self._selector.modify(sock, events)
        elif not events and key is not None:
            self._selector.unregister(sock)

    def _close(self, relay: _Relay) -> None:
        if self._relays.pop(relay.outer, None) is None:
            return
        self._relays.pop(relay.inner, None)
        self._by_name.pop(relay.name, None)
        if (peer := self._peers.pop(relay.name, None)) is not None:
            self._recent[relay.name] = peer
            if len(self._recent) > RECENT_PEERS:
                self._recent.popitem(last=False)
        if (left := self._per_host[relay.host] - 1) > 0:
            self._per_host[relay.host] = left
        else:
            del self._per_host[relay.host]
        for sock in (relay.outer, relay.inner):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        relay.close()


def _remove_folders_of_dead_servers() -> None:
    """Remove the backend folders that gates of processes no longer running left in the temp folder."""
    for folder in Path(tempfile.gettempdir()).glob("prorank-gate-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # gone: nobody serves or connects there
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, as another user
            pass


def _splice(source: int, target: int, n: int) -> int:
    """Move up to `n` bytes from the pipe `source` to the socket `target` in the kernel; 0 when `target`
    is full."""
    try:
        return os.splice(source, target, n, flags=SPLICE)
    except (BlockingIOError, InterruptedError):
        return 0
