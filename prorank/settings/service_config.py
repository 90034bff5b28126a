"""Config sections of the two gRPC services (the reward service and the weight service): where they
listen, their token and TLS, and what callers may hold (prorank/guard/guarded_server.py; SECURITY.md)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from prorank.settings.section import Section


class ServiceLimits(Section):
    """What callers of one of our gRPC servers may hold (prorank/guard/guarded_server.py; SECURITY.md)."""

    max_calls: int = Field(256, ge=1)  # authenticated calls in flight in total; more get RESOURCE_EXHAUSTED
    max_calls_per_peer: int = Field(64, ge=1)  # authenticated calls in flight from one host
    max_streams_per_connection: int = Field(128, ge=1)  # HTTP/2 streams open at once on one connection
    # The HTTP/2 flow-control window per stream: what a caller can send before the server reads. A call
    # without the token is refused before its body is read, so this bounds its bytes.
    stream_window_kb: int = Field(64, ge=16, le=65536)
    log_refusals_every_seconds: float = Field(10.0, ge=0)  # a refusal is logged at most this often per host and kind
    # A connection that has not finished the HTTP/2 handshake in this time is closed (2,000 that send
    # nothing would otherwise hold 2,000 file descriptors for gRPC's default 120 s).
    handshake_timeout_seconds: float = Field(5.0, gt=0)
    # A connection with no call in flight for this long is sent GOAWAY and closed; our clients reconnect
    # on their next call (milliseconds on a LAN).
    idle_connection_seconds: float = Field(10.0, gt=0)
    # Connections one host may hold (prorank/guard/connection_gate.py): one per engine, client and relay is what
    # our own processes open, so raise it past 16 only for more processes per node than that. 0: none
    # (gRPC's own accept, no cap). A flood needs many connections: with 4 it held, with 32-64 it did not.
    max_connections_per_peer: int = Field(16, ge=0)
    max_connections: int = Field(4096, ge=1)  # connections held from all hosts together
    # With the accept layer: a connection that has not yet carried an authenticated call may open and reset
    # this many HTTP/2 streams a second (rapid reset; prorank/guard/stream_budget.py). Past it, it and its
    # host's other such connections are closed, and the host's new connections refused for the cooldown.
    # Our clients send the token on their first call, so they meet none of this.
    max_unauthenticated_streams_per_second: int = Field(256, ge=1)
    max_unauthenticated_resets_per_second: int = Field(16, ge=1)
    max_unauthenticated_resets_per_second_total: int = Field(256, ge=1)  # from all such connections together
    abuse_cooldown_seconds: float = Field(10.0, ge=0)


class ServiceConfig(ServiceLimits):
    """What both gRPC services share: where they listen, their token, TLS, and their limits."""

    section: ClassVar[str]  # the config section, for error messages
    host: str = "127.0.0.1"  # loopback unless configured: set 0.0.0.0 (with TLS) on a cluster
    port: int = Field(0, ge=0, le=65535)  # 0: any free port
    token_file: str | None = None  # else $PRORANK_TOKEN; a server will not start without a token
    tls_cert: str | None = None  # PEM; with tls_key the server speaks TLS only
    tls_key: str | None = None
    tls_ca: str | None = None  # PEM the clients trust (the cert itself when self-signed)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{self.section}.tls_cert and {self.section}.tls_key go together")
        return self


class RewardConfig(ServiceConfig):
    """The reward service (server side) and how clients reach it."""

    section: ClassVar[str] = "reward"
    port: int = Field(50151, ge=0, le=65535)  # 0: any free port
    open_health_check: bool = False  # let the health service answer without a token (k8s probes)
    strict_format: bool = True  # format reward: exactly "0"/"1" (strict) or a leading answer (lenient)
    relevance_threshold: int = 1  # a qrel score at or above this is relevant
    format_weight: float = 1.0
    relevance_weight: float = 1.0
    max_message_mb: int = Field(64, ge=4)
    max_groups: int = Field(4096, ge=1)  # per Score call; more is refused (INVALID_ARGUMENT)
    max_completions: int = Field(64, ge=1)  # per group (G); more is refused
    max_completion_chars: int = Field(4096, ge=1)  # per completion; longer is refused
    max_id_chars: int = Field(256, ge=1)  # per request_id, query_id and doc_id; longer is refused
    grace_seconds: float = Field(5.0, ge=0)
    replicas: int = Field(1, ge=1)  # started as Ray actors by the training job
    max_restarts: int = Field(3, ge=0)  # Ray restarts a replica that died this often (the client follows)
    num_cpus: float = Field(1, ge=0)  # per replica actor
    resources: dict[str, float] = {}  # Ray custom resources, to place replicas on their node type
    addresses: list[str] = []  # clients: replicas to use; empty means the job's own
    timeout_seconds: float = Field(10.0, gt=0)  # client deadline per call
    # Retries back off exponentially (0.2, 0.4, ... capped at 2 s): about 10 s in all, so a replica
    # restarted in a few seconds fails no step, even when it is the only one.
    retries: int = Field(8, ge=0)
    backoff_seconds: float = Field(0.2, ge=0)
    max_backoff_seconds: float = Field(2.0, ge=0)


class WeightSyncConfig(ServiceConfig):
    """The weight service: the learner's server (host, port), and the relay each actor runs for the next
    one (relay_host); both speak TLS with tls_cert/tls_key."""

    section: ClassVar[str] = "weights"
    chunk_mb: float = Field(1.0, gt=0, le=32)
    relay: bool = True  # actors pass chunks on in a pipeline: the learner sends one copy, not one per actor
    relay_host: str = "127.0.0.1"  # where an actor's relay listens; 0.0.0.0 on a cluster (node IP is announced)
    relay_wait_seconds: float = Field(30.0, gt=0)  # then an actor pulls from the learner directly
    wait_seconds: float = Field(300.0, gt=0)
    # bfloat16: float tensors go on the wire (and into the receivers' blobs) as bfloat16, half the bytes of
    # float32; receivers cast to their engine's dtype. For GPU configs; see BENCHMARKS.md for its logprob cost.
    wire_dtype: Literal["same", "bfloat16"] = "same"
    # No accept layer by default: its relay cost the loopback weight transfer 0.79x on 2 cores (same
    # run; BENCHMARKS.md), on the critical path of every sync. Set 16 where untrusted hosts reach the port.
    max_connections_per_peer: int = Field(0, ge=0)
