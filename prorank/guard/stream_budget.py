"""The connection gate's budget on what a connection without an authenticated call may do: how many HTTP/2
streams it opens and resets per second, and how many resets all such connections send together; a peer
past it is closed, and its host's new connections are refused for a cooldown.

Why: HTTP/2 rapid reset (CVE-2023-44487) opens a stream and resets it at once, hundreds of thousands of
times a second, on connections that never carry the token; gRPC has no per-peer budget on it (issue 47).
Our own callers send the token on their first call and never reset a stream before it, so a connection
is budgeted only until its first authenticated call (the server's CallGuard tells the gate, `trust`).
Why frames and not calls: most reset streams never reach Python (1,863 of 6.5 M in 15 s here), so the
gate reads the frame headers of the bytes it relays (a peek, then the same splice as before), 9 bytes a
frame, until the connection is trusted. TLS passes the gate unread: a connection whose first bytes are not
the HTTP/2 preface is not parsed, and only the caps on connections apply to it (SECURITY.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM = 0x1, 0x3
SETTING = "unauthenticated_"  # the config keys' shared part, as errors name them


@dataclass(frozen=True)
class BudgetLimits:
    """Per second, for a connection without an authenticated call (reward.* and weights.* set these)."""

    streams: int = 256  # streams one such connection opens (max_unauthenticated_streams_per_second)
    resets: int = 16  # streams one such connection resets (max_unauthenticated_resets_per_second)
    resets_total: int = 256  # resets from all such connections together (..._resets_per_second_total)
    cooldown_seconds: float = 10.0  # a host past the budget gets no new connection this long


@dataclass
class FrameCounter:
    """One connection's HTTP/2 frames as they pass, counted per one-second window: HEADERS (streams opened)
    and RST_STREAM (streams reset). `parsing` ends when the connection is trusted or is not plaintext HTTP/2."""

    parsing: bool = True
    preface_left: bytes = PREFACE
    head: bytes = b""  # a frame header's first bytes, until all 9 have passed
    skip: int = 0  # bytes of the current frame's payload still to pass
    window: float = 0.0  # when the counted second began
    streams: int = 0
    resets: int = 0

    def feed(self, data: bytes) -> tuple[int, int]:
        """Walk `data` (the next bytes the caller sent); returns (streams opened, streams reset) in it."""
        streams = resets = i = 0
        if self.preface_left:
            take = data[: len(self.preface_left)]
            if not self.preface_left.startswith(take):  # TLS, or not HTTP/2: nothing here to read
                self.parsing = False
                return 0, 0
            self.preface_left, i = self.preface_left[len(take) :], len(take)
        n = len(data)
        while i < n:
            if self.skip:
                step = min(self.skip, n - i)
                self.skip, i = self.skip - step, i + step
                continue
            need = 9 - len(self.head)
            self.head, i = self.head + data[i : i + need], i + need
            if len(self.head) < 9:
                break
            kind = self.head[3]
            streams += kind == HEADERS
            resets += kind == RST_STREAM
            self.skip, self.head = int.from_bytes(self.head[:3], "big"), b""
        return streams, resets


@dataclass
class StreamBudget:
    """The counts against `limits`, per connection (its FrameCounter) and in all, and the hosts cooling
    down. Runs on the gate's thread only."""

    limits: BudgetLimits
    max_hosts: int = 4096  # hosts cooling down that are remembered: a flood of hosts cannot grow the table
    resets_total: int = 0
    window: float = 0.0
    cooling: OrderedDict[str, float] = field(default_factory=OrderedDict)  # host -> until (monotonic)

    def charge(self, counter: FrameCounter, data: bytes) -> str | None:
        """Count what `data` opens and resets on `counter`'s connection; why the connection must close, or
        None."""
        streams, resets = counter.feed(data)
        if not (streams or resets):
            return None
        now = time.monotonic()
        if now - counter.window >= 1.0:
            counter.window, counter.streams, counter.resets = now, 0, 0
        if now - self.window >= 1.0:
            self.window, self.resets_total = now, 0
        counter.streams += streams
        counter.resets += resets
        self.resets_total += resets
        limits = self.limits
        if counter.resets > limits.resets:
            return f"{counter.resets} streams reset in 1 s; at most {limits.resets} (max_{SETTING}resets_per_second)"
        if counter.streams > limits.streams:
            return f"{counter.streams} streams in 1 s; at most {limits.streams} (max_{SETTING}streams_per_second)"
        if resets and self.resets_total > limits.resets_total:
            return (
                f"{self.resets_total} streams reset in 1 s by all unauthenticated connections; at most "
                f"{limits.resets_total} (max_{SETTING}resets_per_second_total)"
            )
        return None

    def cool_down(self, host: str) -> None:
        self.cooling.pop(host, None)
        self.cooling[host] = time.monotonic() + self.limits.cooldown_seconds
        while len(self.cooling) > self.max_hosts:
            self.cooling.popitem(last=False)

    def cooling_left(self, host: str) -> float:
        """Seconds before `host` may connect again (0: it may)."""
        until = self.cooling.get(host)
        if until is None:
            return 0.0
        if (left := until - time.monotonic()) <= 0:
            del self.cooling[host]
            return 0.0
        return left
