"""The reward service: a gRPC server that holds one split's qrels and scores grouped judgments.

Runs as its own process (`prorank reward serve`) or inside a Ray actor (`reward.replica`).
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocol import reward_pb2, reward_pb2_grpc
from prorank.config import RewardConfig
from prorank.security import TokenAuthInterceptor, load_token, server_credentials
from reward.scoring import group_stats, label_of, score_completions

log = logging.getLogger(__name__)
SERVICE = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class RewardServicer(reward_pb2_grpc.RewardServicer):
    def __init__(self, qrels: dict[str, dict[str, int]], cfg: RewardConfig):
        self.qrels, self.cfg = qrels, cfg

    def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        problem = validate(request, self.cfg)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return reward_pb2.ScoreResponse(groups=[self.score_group(g) for g in request.groups])

    def score_group(self, group: reward_pb2.Group) -> reward_pb2.GroupReward:
        judged = self.qrels.get(group.query_id)
        if judged is None:
            return reward_pb2.GroupReward(request_id=group.request_id, status=reward_pb2.UNKNOWN_QUERY,
                                          error=f"unknown query id {clip(group.query_id)!r}")
        label = label_of(judged, group.doc_id, self.cfg.relevance_threshold)
        scores = score_completions(group.completions, label, self.cfg)
        mean, std = group_stats(scores)
        return reward_pb2.GroupReward(
            request_id=group.request_id, label=label, mean=mean, std=std,
            rewards=[reward_pb2.CompletionReward(format=s.format, relevance=s.relevance, total=s.total,
                                                 judgment=s.judgment) for s in scores],
        )


def clip(text: str, limit: int = 100) -> str:
    """Client input quoted in an error, cut to `limit` characters: an error never grows with the input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def validate(request: reward_pb2.ScoreRequest, cfg: RewardConfig) -> str | None:
    """Why a request is malformed or over the configured limits, or None."""
    if not request.groups:
        return "no groups in the request"
    if len(request.groups) > cfg.max_groups:
        return f"{len(request.groups)} groups in one request; at most {cfg.max_groups} (reward.max_groups)"
    for i, g in enumerate(request.groups):
        where = f"group {i} ({clip(g.request_id) or 'no request_id'})"
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
            return (f"{where}: a completion of {longest} characters; at most {cfg.max_completion_chars} "
                    "(reward.max_completion_chars)")
    return None


class RewardServer:
    """A started server; `address` is host:port (the port resolved when 0 was asked for)."""

    def __init__(self, qrels: dict[str, dict[str, int]], cfg: RewardConfig, token: str | None = None):
        token = token or load_token(cfg.token_file)
        limit = cfg.max_message_mb * 2**20
        open_methods = HEALTH_METHODS if cfg.open_health_check else frozenset()
        self.cfg = cfg
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
            interceptors=[TokenAuthInterceptor(token, open_methods)],
            # so_reuseport off: a second server on a port in use fails to start instead of sharing it.
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
        )
        reward_pb2_grpc.add_RewardServicer_to_server(RewardServicer(qrels, cfg), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        target = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            self.port = self.server.add_secure_port(target, server_credentials(cfg.tls_cert, cfg.tls_key))
        else:
            self.port = self.server.add_insecure_port(target)
        self.address = f"{cfg.host}:{self.port}"

    def start(self) -> RewardServer:
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("reward service on %s (%s)", self.address, "TLS" if self.cfg.tls_cert else "plaintext")
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health turns NOT_SERVING, new calls are refused, calls in flight get `grace` s."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.cfg.grace_seconds if grace is None else grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()
