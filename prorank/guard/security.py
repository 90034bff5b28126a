"""What every gRPC service of ours shares: a bearer token on every call, optional TLS.

Services bind 127.0.0.1 unless configured otherwise and refuse to start without a token; the check of
each call (and the limits on callers) is prorank/guard/guarded_server.py's.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "PRORANK_TOKEN"


class SecurityError(ValueError):
    """A token or certificate that cannot be used."""


def load_token(token_file: str | None) -> str:
    """The token from `token_file`, else from $PRORANK_TOKEN; an error when neither gives one."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as err:
            raise SecurityError(f"cannot read token file {token_file}: {err.strerror}") from err
        if not token:
            raise SecurityError(f"token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise SecurityError(f"no token: give a token file or set ${TOKEN_ENV}")
    return token


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityError(f"cannot read {what} {path}: {err.strerror}") from err


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key, "TLS key"), _read(cert, "TLS certificate"))])


def channel_credentials(ca: str | None) -> grpc.ChannelCredentials:
    """TLS trusting `ca` (PEM), or the system roots when None."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "TLS CA") if ca else None)


def announced_address(host: str, port: int) -> str:
    """The address other nodes reach a server bound to `host` on: the node's IP for a wildcard bind."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

        host = ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"
