"""A pool of rollout actors: Ray actors each holding a live vLLM engine (`actors.engine.RolloutEngine`).

The driver owns a queue of chunks (a few requests each) and hands the next chunk to the ready actor with
the fewest prompts in flight, so a slow or busy actor gets less work. Every chunk stays recorded against
its actor until its results are collected; if the actor dies, its chunks go back to the front of the
queue and a replacement is started, so no request is lost and none is answered twice.

`scale(n)` works while requests stream: a removed actor takes no new work and is stopped once its chunks
are done; a new actor loads the latest weights before it is given any work.

Weight sync need not stop the work: `sync_weights(address, wait=False)` queues the pull behind each actor's
chunks in flight, so each actor applies the new version between two chunks, and every chunk given out
after that call is generated with it. `score(pairs)` runs the dev evaluation on an actor the same way.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from prorank.actors.engine import RolloutEngine
from prorank.run.rollout import GroupResult, RolloutRequest
from prorank.run.weight_transport import ReceiverFactory
from prorank.settings.config import ActorConfig, PromptConfig, SamplingConfig

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """The pool cannot make progress (actors keep dying, or there are none to run the work)."""


@dataclass(eq=False)
class _Slot:
    name: str
    handle: ActorHandle
    ready_ref: ObjectRef | None  # pending until the engine is up with the latest weights
    inflight: dict = field(default_factory=dict)  # chunk ObjectRef -> (engine method, its requests)
    version: int = 0
    draining: bool = False
    relay_address: str = ""  # where the next actor pulls weights from this one
    sync_ref: ObjectRef | None = None  # a weight pull queued behind the chunks in flight (sync without waiting)

    @property
    def load(self) -> int:
        return sum(len(chunk) for _, chunk in self.inflight.values())


class ActorPool:
    """`receivers`: makes each actor's end of the weight transport from its name (the driver's choice of
    transport, prorank/run/weight_transport.py); None: the actors serve their start weights only."""

    def __init__(
        self,
        model: str,
        actors: ActorConfig,
        sampling: SamplingConfig,
        prompt: PromptConfig,
        receivers: ReceiverFactory | None = None,
    ):
        self.model, self.cfg, self.sampling, self.prompt = model, actors, sampling, prompt
        self.receivers = receivers
        self.relays = False  # whether the actors' receivers hand each version on (known once one is made)
        self.slots: dict[str, _Slot] = {}
        self.replaced = 0  # actors lost (died, or their node did), for metrics
        self.requeued = 0  # requests put back in the queue after their actor was lost, for metrics
        self.relay_fallbacks = 0  # weight pulls that fell back from a failed relay hop to the learner
        self.refused = 0  # weight versions an actor refused (a bad transfer): it kept its last good one
        self.busy_seconds = 0.0  # summed over actors: generating, scoring and pulling weights
        self.received_bytes = 0.0  # weight bytes the actors received
        self._queue: deque[tuple[str, list]] = deque()  # (engine method, a chunk of its requests)
        self._finished: list = []  # results collected, not yet handed to the caller
        self._next_index = 0
        self._upstream: dict[str, str | None] = {}  # each actor's relay source in the last sync
        self._weight_server = ""  # the sender's address, once a version was published
        self._failures = 0  # consecutive actor deaths; reset by any success
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(actors.kv_cache_gib),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self._actor_cls = ray.remote(RolloutEngine).options(
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
            resources=actors.resources or None,
            max_restarts=0,
            runtime_env={"env_vars": env},
        )

    # ------------------------------------------------------------ membership

    def start(self, wait: bool = True) -> ActorPool:
        self.scale(self.cfg.num_actors)
        if wait:
            self.wait_ready()
        return self

    def scale(self, n: int) -> None:
        """Grow or shrink to `n` actors without pausing the work in flight."""
        if n < 0:
            raise ValueError(f"cannot scale to {n} actors")
        active = [s for s in self.slots.values() if not s.draining]
        for _ in range(n - len(active)):
            self._spawn()
        # Shrink starting actors first, then the least loaded ones.
        for slot in sorted(active, key=lambda s: (s.ready_ref is None, s.load))[: max(0, len(active) - n)]:
            slot.draining = True
        self._reap()

    @property
    def size(self) -> int:
        return sum(not s.draining for s in self.slots.values())

    @property
    def ready(self) -> int:
        """Actors taking work now (the others are starting, or waiting for a node)."""
        return sum(not s.draining and s.ready_ref is None for s in self.slots.values())

    @property
    def latest_version(self) -> int:
        """The newest version the pool has handed out or seen an actor apply."""
        return max([0] + [s.version for s in self.slots.values()])

    def versions(self) -> dict[str, int]:
        """Weights version each live actor serves (as last confirmed by the actor)."""
        return {s.name: s.version for s in self.slots.values() if s.ready_ref is None}

    def nodes(self) -> dict[str, str]:
        """The Ray node id each live actor runs on."""
        live = [s for s in self.slots.values() if s.ready_ref is None]
        return {s.name: info["node"] for s, info in zip(live, ray.get([s.handle.info.remote() for s in live]))}

    def wait_ready(self, timeout: float | None = None) -> None:
        while any(s.ready_ref is not None for s in self.slots.values()):
            if not self._pump(timeout=timeout) and timeout is not None:
                raise TimeoutError(f"rollout actors not ready after {timeout}s")

    def wait_synced(self, timeout: float | None = None) -> None:
        """Until every weight pull queued without waiting has been answered."""
        while any(s.sync_ref is not None or s.ready_ref is not None for s in self.slots.values()):
            if not self._pump(timeout=timeout) and timeout is not None:
                raise TimeoutError(f"weight sync not answered after {timeout}s")

    def receiver_names(self, ahead: int = 16) -> list[str]:
        """Names the weight server should accept reports from: the actors now, and the next `ahead` to start."""
        return [*self.slots, *(f"rollout-{i}" for i in range(self._next_index, self._next_index + ahead))]

    def shutdown(self) -> None:
        for slot in self.slots.values():
            ray.kill(slot.handle)
        self.slots.clear()
        self._queue.clear()

    def _spawn(self) -> None:
        index, self._next_index = self._next_index, self._next_index + 1
        name = f"rollout-{index}"
        receiver = self.receivers(name) if self.receivers else None
        self.relays = bool(receiver and receiver.relays)
        handle = self._actor_cls.remote(self.model, self.cfg, self.sampling, self.prompt, name, index, receiver)
        # Actor calls run in order: the engine starts, loads the latest weights, then takes work.
        if self._weight_server:  # pull the newest version, if one is published, before any work
            ready = handle.sync_weights.remote(self._weight_server, wait_seconds=1.0)
        else:
            ready = handle.info.remote()
        self.slots[name] = _Slot(name, handle, ready)

    def _reap(self) -> None:
        for slot in [s for s in self.slots.values() if s.draining and not s.inflight]:
            ray.kill(slot.handle)
            del self.slots[slot.name]

    def _lost(self, slot: _Slot, err: Exception) -> None:
        """An actor died: requeue its chunks first in line, replace it unless it was being removed."""
        if self.slots.pop(slot.name, None) is None:
            return  # already handled through another of its refs
        self._queue.extendleft(reversed(list(slot.inflight.values())))
        self.requeued += sum(len(chunk) for _, chunk in slot.inflight.values())
        slot.inflight.clear()
        self._failures += 1
        self.replaced += 1
        log.warning("actor %s died (%s); %d chunk(s) requeued", slot.name, type(err).__name__, len(self._queue))
        if self._failures > self.cfg.max_restarts:
            raise PoolError(f"rollout actors died {self._failures} times in a row; last: {slot.name}: {err}")
        if not slot.draining:
            self._spawn()

    # ------------------------------------------------------------ work

    def submit(self, requests: Sequence, method: str = "generate", chunk_size: int | None = None) -> None:
        """Queue `requests` for the engine's `method` (`generate`: judgments, RolloutRequest -> GroupResult;
        `write_queries`: query synthesis, QueryRequest -> WrittenQueries), `chunk_size` (default
        `actors.chunk_size`) to an actor call."""
        size = chunk_size or self.cfg.chunk_size
        self._queue.extend((method, list(requests[i : i + size])) for i in range(0, len(requests), size))
        self._dispatch()

    @property
    def queued(self) -> int:
        """Requests submitted and not yet answered (queued or in flight)."""
        waiting = sum(len(chunk) for _, chunk in self._queue)
        return waiting + sum(s.load for s in self.slots.values())

    def poll(self, timeout: float | None = 1.0) -> list:
        """Results that finished within `timeout` seconds (possibly none)."""
        self._pump(timeout)
        results, self._finished = self._finished, []
        return results

    def stream(self, requests: Sequence[RolloutRequest]) -> Iterator[GroupResult]:
        """Groups as they finish, each request exactly once. One stream at a time per pool."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a batch")
        self.submit(requests)
        remaining = len(requests)
        while remaining:
            for result in self.poll(timeout=1.0):
                remaining -= 1
                yield result

    def generate(self, requests: Sequence[RolloutRequest]) -> list[GroupResult]:
        """Results in the order of `requests`."""
        by_id = {r.request_id: r for r in self.stream(requests)}
        return [by_id[r.request_id] for r in requests]

    def sync_weights(
        self, address: str, version: int | None = None, wait: bool = True, wait_seconds: float | None = None
    ) -> dict[str, dict]:
        """Every actor pulls the newest version and applies it; actors started later do the same before
        any work. With `weights.relay`, the actors form a pipeline: the first pulls from the learner's
        server at `address`, each next one from the relay of the one before, while it still receives.
        `version` is the one just published (an actor that already serves it answers at once).
        Returns each actor's answer; with `wait=False`, returns at once: each actor pulls after the chunks
        it has in flight, and its answer is taken in by `poll` (a refusal is counted and logged).
        `wait_seconds`: how long an actor waits for a version (default: the receivers' `weights.wait_seconds`)."""
        self._weight_server = address
        upstream: dict[str, str | None] = {}
        if self.relays:
            previous = None
            for slot in [s for s in self.slots.values() if s.ready_ref is None]:
                upstream[slot.name] = previous
                try:
                    previous = self._relay_address(slot)
                except RayActorError as err:
                    self._lost(slot, err)
        self._upstream = upstream

        def per_actor(slot: _Slot) -> dict:
            return {"upstream": upstream.get(slot.name), "version": version, "wait_seconds": wait_seconds}

        if not wait:
            for slot in list(self.slots.values()):
                ref = slot.handle.sync_weights.remote(address, **per_actor(slot))
                if slot.ready_ref is None:
                    slot.sync_ref = ref  # a newer pull supersedes the older one's answer
                else:
                    slot.ready_ref = ref
            return {}
        answers = self._on_every_actor("sync_weights", address, per_actor=per_actor)
        for name, answer in answers.items():
            self._took_sync(name, answer)
        return answers

    def _took_sync(self, name: str, answer: dict) -> None:
        # An actor that had a relay before it but got the version from the learner: its relay hop failed.
        if self._upstream.get(name) and answer["source"] == self._weight_server:
            self.relay_fallbacks += 1
        self.busy_seconds += answer.get("seconds", 0.0)
        self.received_bytes += answer.get("bytes", 0)
        if answer["error"]:
            self.refused += 1
            log.warning(
                "actor %s refused a weights version and serves %d: %s", name, answer["version"], answer["error"][:300]
            )

    def score(
        self, pairs: list[tuple[str, str]], exclude: Container[str] = (), judge: list[tuple[str, str]] | None = None
    ) -> tuple[ObjectRef, str]:
        """Score (query, document text) pairs on the least loaded actor (not one in `exclude`), after the
        calls already queued to it (so under the newest version it was sent), and give the greedy answers
        to `judge`. Returns the call's ObjectRef and the actor's name; the ref's value is {"scores",
        "judgments", "version", "seconds", "actor"}: hand it to `scored` when ready."""
        live = [s for s in self.slots.values() if not s.draining and s.ready_ref is None and s.name not in exclude]
        if not live:
            raise PoolError("no rollout actor is ready to score the dev pairs")
        slot = min(live, key=lambda s: s.load)
        return slot.handle.score.remote(pairs, judge), slot.name

    def scored(self, value: dict) -> dict:
        """Take a `score` answer in (its seconds count as the actor's busy time); returns it."""
        self.busy_seconds += value["seconds"]
        return value

    def _relay_address(self, slot: _Slot) -> str:
        if not slot.relay_address:
            slot.relay_address = ray.get(slot.handle.relay_address.remote())
        return slot.relay_address

    def _on_every_actor(self, method: str, *args, per_actor=lambda slot: {}) -> dict[str, dict]:
        """Call `method` on every serving actor at once and collect the answers by actor name. An actor
        that dies meanwhile is replaced (the replacement gets the weights on start). An actor still
        starting gets the call queued behind its start-up and is not waited for: it may be waiting for
        a node (one cut off the network comes back), and it takes no work before the call has run."""
        pending = {}
        for slot in list(self.slots.values()):
            ref = getattr(slot.handle, method).remote(*args, **per_actor(slot))
            if slot.ready_ref is None:
                pending[ref] = slot
            else:  # actor calls run in order: this one resolving means the start-up has too
                slot.ready_ref = ref
        answers: dict[str, dict] = {}
        for ref, slot in pending.items():
            try:
                answers[slot.name] = ray.get(ref)
            except RayActorError as err:
                self._lost(slot, err)
                continue
            slot.version = max(slot.version, _served_version(answers[slot.name]))
        return answers

    def _dispatch(self) -> None:
        while self._queue:
            free = [
                s
                for s in self.slots.values()
                if not s.draining and s.ready_ref is None and len(s.inflight) < self.cfg.max_chunks_in_flight
            ]
            if not free:
                return
            slot = min(free, key=lambda s: s.load)
            method, chunk = self._queue.popleft()
            slot.inflight[getattr(slot.handle, method).remote(chunk)] = (method, chunk)

    def _pump(self, timeout: float | None) -> bool:
        """Wait up to `timeout` for actor replies and act on them; False if none came."""
        self._dispatch()
        waiting = {ref: s for s in self.slots.values() for ref in s.inflight}
        waiting |= {s.ready_ref: s for s in self.slots.values() if s.ready_ref is not None}
        waiting |= {s.sync_ref: s for s in self.slots.values() if s.sync_ref is not None}
        if not waiting:
            if self._queue:
                raise PoolError(f"{self.queued} requests queued but the pool has no actors")
            return False
        done, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
        if done:  # collect everything else that is already finished too
            done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        for ref in done:
            slot = waiting[ref]
            if slot.name not in self.slots:
                continue
            try:
                value = ray.get(ref)
            except RayActorError as err:
                self._lost(slot, err)
                continue
            self._failures = 0
            if ref == slot.ready_ref:
                slot.ready_ref = None
                # An update sent while the actor was starting may already have been confirmed.
                slot.version = max(slot.version, _served_version(value))
                if isinstance(value, dict) and "error" in value:
                    self._took_sync(slot.name, value)
            elif ref == slot.sync_ref:
                slot.sync_ref = None
                slot.version = max(slot.version, value["version"])
                self._took_sync(slot.name, value)
            elif ref in slot.inflight:
                del slot.inflight[ref]
                slot.version = max([slot.version] + [r.version for r in value])
                self.busy_seconds += value[0].seconds if value else 0.0
                self._finished.extend(value)
        self._reap()
        self._dispatch()
        return bool(done)


def _served_version(answer) -> int:
    """The version an actor serves, from its `info` or `sync_weights` answer."""
    return answer["version"]
