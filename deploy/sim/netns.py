"""The Linux plumbing of the simulated cluster: commands in network namespaces, the probes of what this
kernel and user may do, and the cluster's self-signed TLS certificate. deploy/sim/cluster.py builds on it."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

STEP_TIMEOUT = 120  # any one command of up/down


class SimError(RuntimeError):
    """A step of bringing the cluster up or down failed; the message names the command."""


def quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def sh(*argv: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if out.returncode:
        raise SimError(f"`{' '.join(argv)}` failed: {out.stderr.strip()}")


def has_netem() -> bool:
    """Whether this kernel can delay packets (sch_netem); some container kernels have tbf but not netem."""
    ns = f"prknetem{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", ns], capture_output=True, timeout=30)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "a", "type", "veth", "peer", "name", "b"], capture_output=True, timeout=30
        )
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "a", "root", "netem", "delay", "1ms"],
            capture_output=True,
            timeout=30,
        )
        return out.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in out.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def self_signed(cert: Path, key: Path, ips: list[str]) -> None:
    """A self-signed certificate valid for every node address (the cluster's CA is the cert itself)."""

    from cryptography import x509  # noqa: PLC0415 cryptography: only to make a TLS certificate
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 cryptography: only to make a TLS certificate
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 cryptography: only to make a TLS certificate
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 cryptography: only to make a TLS certificate

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prorank-sim")])
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


@functools.cache  # a probe namespace made and deleted once a process (two test modules ask at collection)
def can_create_namespaces() -> str:
    """'' when this process can make network namespaces and shape links; else why not."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"no `{tool}` command (iproute2)"
    probe = f"prkprobe{os.getpid() % 10000}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""
