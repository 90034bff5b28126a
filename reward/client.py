"""Client of the reward service: async, with deadlines, retries with backoff, and several replicas.

Each call goes to the live replica with the fewest calls in flight (ties in turn). A replica that fails
with UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED (it stopped mid-call) or RESOURCE_EXHAUSTED (its calls in
flight at the cap) is rested for a while and the call is retried on another after an exponential
backoff. Other errors (INVALID_ARGUMENT, UNAUTHENTICATED, ...) are not retried.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from prorank.guard.security import auth_metadata, channel_credentials
from prorank.protocol import reward_pb2, reward_pb2_grpc
from prorank.run.rollout import GroupResult
from prorank.settings.config import RewardConfig

# CANCELLED too: a replica that stops mid-call cancels the calls in flight (this client never cancels one).
# RESOURCE_EXHAUSTED: the replica has its reward.max_calls (or per-peer) calls in flight already.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
REST_SECONDS = 2.0


class RewardError(RuntimeError):
    """A call that failed for good; the message names the replica and the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Replica:
    address: str
    stub: reward_pb2_grpc.RewardStub
    channel: grpc.aio.Channel
    inflight: int = 0
    rest_until: float = 0.0


def client_options(cfg: RewardConfig) -> dict:
    """Keyword arguments of RewardClient / SyncRewardClient from the reward config."""
    return {
        "tls_ca": cfg.tls_ca,
        "tls": bool(cfg.tls_ca or cfg.tls_cert),
        "timeout": cfg.timeout_seconds,
        "retries": cfg.retries,
        "backoff": cfg.backoff_seconds,
        "max_backoff": cfg.max_backoff_seconds,
        "max_message_mb": cfg.max_message_mb,
    }


def groups_from_results(results: Sequence[GroupResult]) -> list[reward_pb2.Group]:
    return [
        reward_pb2.Group(
            request_id=r.request_id, query_id=r.query_id, doc_id=r.doc_id, completions=[c.text for c in r.completions]
        )
        for r in results
    ]


class RewardClient:
    """Create it inside the event loop that will use it (gRPC aio channels belong to one loop)."""

    def __init__(
        self,
        addresses: Sequence[str],
        token: str,
        tls_ca: str | None = None,
        tls: bool = False,
        timeout: float = 10.0,
        retries: int = 8,
        backoff: float = 0.2,
        max_backoff: float = 2.0,
        max_message_mb: int = 64,
    ):
        if not addresses:
            raise ValueError("no reward service addresses")
        limit = max_message_mb * 2**20
        # Reconnect within a second of a replica coming back (gRPC's default backoff grows to minutes,
        # and calls fail at once while it waits: a restarted replica would stay unused).
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._creds = channel_credentials(tls_ca) if (tls or tls_ca) else None
        self._options = options
        self.replicas = [self._connect(a) for a in addresses]
        self.metadata = auth_metadata(token)
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._turn = itertools.count()

    def _connect(self, address: str) -> _Replica:
        channel = (
            grpc.aio.secure_channel(address, self._creds, options=self._options)
            if self._creds
            else grpc.aio.insecure_channel(address, options=self._options)
        )
        return _Replica(address, reward_pb2_grpc.RewardStub(channel), channel)

    async def set_addresses(self, addresses: Sequence[str]) -> None:
        """Follow replicas that moved (a restarted one serves on a new port); unchanged ones keep their channel."""
        kept = {r.address: r for r in self.replicas}
        self.replicas = [kept.pop(a) if a in kept else self._connect(a) for a in addresses]
        await asyncio.gather(*(r.channel.close() for r in kept.values()))

    def _pick(self) -> _Replica:
        now = time.monotonic()
        live = [r for r in self.replicas if r.rest_until <= now]
        if not live:  # all resting: try the one that rests the shortest
            return min(self.replicas, key=lambda r: r.rest_until)
        turn = next(self._turn)
        return min(live, key=lambda r: (r.inflight, (self.replicas.index(r) - turn) % len(self.replicas)))

    async def score(self, groups: Sequence[reward_pb2.Group]) -> list[reward_pb2.GroupReward]:
        request = reward_pb2.ScoreRequest(groups=groups)
        for attempt in itertools.count():
            replica = self._pick()
            replica.inflight += 1
            try:
                response = await replica.stub.Score(request, timeout=self.timeout, metadata=self.metadata)
                return list(response.groups)
            except grpc.aio.AioRpcError as err:
                message = f"reward service {replica.address}: {err.code().name}: {err.details()}"
                if err.code() not in RETRYABLE:
                    raise RewardError(message, err.code()) from None
                replica.rest_until = time.monotonic() + REST_SECONDS
                if attempt >= self.retries:
                    raise RewardError(f"{message} (after {attempt + 1} attempts)", err.code()) from None
                await asyncio.sleep(min(self.backoff * 2**attempt, self.max_backoff))
            finally:
                replica.inflight -= 1
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas))


class SyncRewardClient:
    """The async client on a private event loop thread, for synchronous callers."""

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
        self._thread.start()
        self.client = self._call(self._make(*args, **kwargs))

    @staticmethod
    async def _make(*args, **kwargs) -> RewardClient:
        return RewardClient(*args, **kwargs)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(self, groups: Sequence[reward_pb2.Group]) -> list[reward_pb2.GroupReward]:
        return self._call(self.client.score(groups))

    def set_addresses(self, addresses: Sequence[str]) -> None:
        self._call(self.client.set_addresses(addresses))

    def close(self) -> None:
        self._call(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
