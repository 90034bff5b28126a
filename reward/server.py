"""The reward service: a gRPC server that holds one split's qrels and scores grouped judgments.

Runs as its own process (`prorank reward serve`) or inside a Ray actor (`reward.replica`).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from prorank.guard.guarded_server import GuardedServer, ServerLimits
from prorank.guard.refusals import RefusalLog, clip, parse_or_problem
from prorank.guard.security import load_token
from prorank.protocol import reward_pb2
from prorank.reward.scoring import group_stats, label_of, score_completions
from prorank.settings.config import RewardConfig

log = logging.getLogger(__name__)
SERVICE = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# A request above this many bytes is parsed, checked and scored on a thread beside the event loop, so the
# loop stays free for the small calls (the job's are a few KiB). A maximum-size call (4,096 groups x 64
# completions, ~50 MiB) takes about a second of Python; on the loop, every small call's few gRPC steps
# each waited for it (measured: a small call 2.7 s worst among 8 such calls, bench/hostile.py).
INLINE_BYTES = 2**20


class RewardServicer:
    """Score. Its request arrives as bytes and is parsed here, so a malformed one gets INVALID_ARGUMENT
    (and one rate-limited log line), not INTERNAL and a traceback."""

    def __init__(self, qrels: dict[str, dict[str, int]], cfg: RewardConfig, refusals: RefusalLog):
        self.qrels, self.cfg, self.refusals = qrels, cfg, refusals
        self.big_calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-big-calls")

    async def Score(self, raw: bytes, context) -> reward_pb2.ScoreResponse:
        if len(raw) <= INLINE_BYTES:
            answer = self.answer(raw)
        else:  # one at a time: they share the interpreter anyway
            answer = await asyncio.get_running_loop().run_in_executor(self.big_calls, self.answer, raw)
        if isinstance(answer, str):
            await self.refusals.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, answer)
        return answer

    def answer(self, raw: bytes) -> reward_pb2.ScoreResponse | str:
        """The response, or why the request is refused."""
        request = parse_or_problem(reward_pb2.ScoreRequest, raw)
        if isinstance(request, str):
            return request
        return validate(request, self.cfg) or reward_pb2.ScoreResponse(
            groups=[self.score_group(g) for g in request.groups]
        )

    def score_group(self, group: reward_pb2.Group) -> reward_pb2.GroupReward:
        judged = self.qrels.get(group.query_id)
        if judged is None:
            return reward_pb2.GroupReward(
                request_id=group.request_id,
                status=reward_pb2.UNKNOWN_QUERY,
                error=f"unknown query id {clip(group.query_id)!r}",
            )
        label = label_of(judged, group.doc_id, self.cfg.relevance_threshold)
        scores = score_completions(group.completions, label, self.cfg)
        mean, std = group_stats(scores)
        return reward_pb2.GroupReward(
            request_id=group.request_id,
            label=label,
            mean=mean,
            std=std,
            rewards=[
                reward_pb2.CompletionReward(format=s.format, relevance=s.relevance, total=s.total, judgment=s.judgment)
                for s in scores
            ],
        )


def validate(request: reward_pb2.ScoreRequest, cfg: RewardConfig) -> str | None:
    """Why a request is malformed or over the configured limits, or None."""
    if not request.groups:
        return "no groups in the request"
    if len(request.groups) > cfg.max_groups:
        return f"{len(request.groups)} groups in one request; at most {cfg.max_groups} (reward.max_groups)"
    seen: set[str] = set()
    for i, g in enumerate(request.groups):
        where = f"group {i} ({clip(g.request_id) or 'no request_id'})"
        for field in ("request_id", "query_id", "doc_id"):
            if len(value := getattr(g, field)) > cfg.max_id_chars:
                return (
                    f"{where}: a {field} of {len(value)} characters; at most {cfg.max_id_chars} (reward.max_id_chars)"
                )
        if g.request_id in seen:  # its answer could not be told from the other's
            return f"{where}: request_id {clip(g.request_id)!r} is used twice in one request"
        seen.add(g.request_id)
        if not g.query_id:
            return f"{where}: empty query_id"
        if not g.doc_id:
            return f"{where}: empty doc_id"
        if not g.completions:
            return f"{where}: no completions"
        if len(g.completions) > cfg.max_completions:
            return f"{where}: {len(g.completions)} completions; at most {cfg.max_completions} (reward.max_completions)"
        longest = max(map(len, g.completions))
        if longest > cfg.max_completion_chars:
            return (
                f"{where}: a completion of {longest} characters; at most {cfg.max_completion_chars} "
                "(reward.max_completion_chars)"
            )
    return None


class RewardServer:
    """A started server; `address` is host:port (the port resolved when 0 was asked for)."""

    def __init__(self, qrels: dict[str, dict[str, int]], cfg: RewardConfig, token: str | None = None):
        token = token or load_token(cfg.token_file)
        limit = cfg.max_message_mb * 2**20
        self.cfg = cfg

        def add_services(server: grpc.aio.Server, refusals: RefusalLog) -> None:
            self.servicer = servicer = RewardServicer(qrels, cfg, refusals)
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        SERVICE,
                        {
                            "Score": grpc.unary_unary_rpc_method_handler(
                                servicer.Score, response_serializer=reward_pb2.ScoreResponse.SerializeToString
                            )
                        },
                    ),
                )
            )
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

        self.server = GuardedServer(
            add_services,
            token,
            cfg.host,
            cfg.port,
            cfg.tls_cert,
            cfg.tls_key,
            ServerLimits.of(cfg),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            open_methods=HEALTH_METHODS if cfg.open_health_check else frozenset(),
            name="reward",
        )
        self.port = self.server.port
        self.address = f"{cfg.host}:{self.port}"

    def start(self) -> RewardServer:
        self.server.start()
        for name in ("", SERVICE):
            self.server.run(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))
        log.info("reward service on %s (%s)", self.address, "TLS" if self.cfg.tls_cert else "plaintext")
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health turns NOT_SERVING, new calls are refused, calls in flight get `grace` s."""
        self.server.stop(self.cfg.grace_seconds if grace is None else grace, first=self.health.enter_graceful_shutdown)
        self.servicer.big_calls.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        self.server.wait()
