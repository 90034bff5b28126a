"""Refusals, logged so that an operator can act on them: every line names the real caller
(`ipv4:127.0.0.2:51234`, through the connection gate), and is written at most once per peer host and kind
per interval, with a count since the last; and the checks on a request's body that end a call with one."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from prorank.guard.connection_gate import peer_host

log = logging.getLogger(__name__)

WHAT = {"CONNECTION": "refused a connection from", "BUDGET": "closed the connection of"}  # else a call


class RefusalLog:
    """Logs a refusal at most once per (peer host, kind) per `every` seconds, with how many there were
    since; a bounded table, so a flood of peers cannot grow it."""

    def __init__(self, every: float, max_peers: int = 4096, real_peer: Callable[[str], str] = str):
        self.every, self.max_peers, self.real_peer = every, max_peers, real_peer
        self._seen: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()  # -> (last logged, count since)
        self._lock = threading.Lock()
        self.logged = 0  # lines written (the tests count them)

    def host(self, peer: str) -> str:
        """gRPC's `context.peer()` -> the caller's host (through the accept layer, if there is one)."""
        return peer_host(self.real_peer(peer))

    def refused(self, peer: str, kind: str, detail: str) -> None:
        """One refusal of `kind` (a status code's name, CONNECTION or BUDGET) of gRPC's `peer`."""
        caller = self.real_peer(peer)
        key, now = (peer_host(caller), kind), time.monotonic()
        with self._lock:
            last, count = self._seen.pop(key, (float("-inf"), 0))
            count += 1
            if now - last < self.every:
                self._seen[key] = (last, count)
                return
            self._seen[key] = (now, 0)
            while len(self._seen) > self.max_peers:
                self._seen.popitem(last=False)
            self.logged += 1
        log.warning(
            "%s %s, %s: %s (%d such refusal(s) from %s since its last line)",
            WHAT.get(kind, "refused a call from"),
            caller,
            kind,
            detail,
            count,
            key[0],
        )

    async def refuse(self, context, code: grpc.StatusCode, message: str) -> NoReturn:
        """Log (rate-limited) and end the call with `code`; raises, as `context.abort` does."""
        self.refused(context.peer(), code.name, message)
        await context.abort(code, message)
        raise RuntimeError(f"gRPC's abort returned for {context.peer()}")  # it raises: never reached


def clip(text: str, limit: int = 100) -> str:
    """Client input quoted in an error, cut to `limit` characters: an error never grows with the input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_or_problem(message_type, raw: bytes):
    """`raw` parsed as `message_type`, or why it cannot be (a str)."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        return f"malformed request: not a {message_type.DESCRIPTOR.full_name}"


async def parse_request(message_type, raw: bytes, context, refusals: RefusalLog):
    """`raw` parsed as `message_type`; a malformed one ends the call with INVALID_ARGUMENT (logged once
    per peer and interval, no traceback)."""
    parsed = parse_or_problem(message_type, raw)
    if isinstance(parsed, str):
        await refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, parsed)
    return parsed
