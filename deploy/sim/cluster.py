"""A multi-node Ray cluster on one machine: each node a Linux network namespace behind a shaped link.

    sudo deploy/sim/simcluster.sh up --nodes learner,reward,actor,actor --rate 800mbit --delay 0.2ms
    deploy/sim/simcluster.sh train configs/quickstart.yaml      # `prorank train` on it, from the head node
    sudo deploy/sim/simcluster.sh down

Layout: a "switch" namespace holds a bridge; node i is the namespace `<name>-n<i>` with one veth `eth0`
(address 10.77.<subnet>.<i+1>/24) whose other end is a port of the bridge. Both ends are shaped with `tc`
(netem delay, then a token bucket at the link rate), so every byte between two nodes crosses two shaped
links, as through a real switch. Nothing is addressed in the root namespace.

Node 0 runs the Ray head (and the job's driver); every other node runs `ray start --address` under a
small supervisor that starts it again when Ray declares the node dead (a partitioned node rejoins once
its link is back, as a node agent such as a KubeRay pod restart would). Each node offers the custom
resource of its role (`learner_node`, `reward_node`, `actor_node`) as `configs/cluster-*.yaml` asks. The
services of a job on it bind the node's address with the cluster's token and TLS certificate
(`train_overrides`). The state of a running cluster is `<state dir>/cluster.json`; `down` reads it and
removes every namespace, link and process, also after a failed `up`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.sim.netns import STEP_TIMEOUT, SimError, has_netem, netns_list, netns_pids, quote, self_signed, sh

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("learner", "reward", "actor")
RAY_PORT = 6379
# Ray declares a silent node dead after about period x threshold (defaults: about 30 s).
HEALTH_ENV = {
    "RAY_health_check_initial_delay_ms": "2000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}
# A worker node's raylet gives up on an unreachable head after this long; its supervisor restarts it.
WORKER_ENV = {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}
NODE_RESTARTS = 100  # a supervisor's bound


@dataclass
class Node:
    index: int
    role: str
    ns: str
    ip: str
    cpus: int

    @property
    def resource(self) -> str:
        return f"{self.role}_node"


@dataclass
class SimCluster:
    name: str = "prksim"
    roles: list[str] = field(default_factory=lambda: ["learner", "reward", "actor", "actor"])
    subnet: int = 77  # the /24 is 10.77.<subnet>... see network
    rate: str = "800mbit"
    delay: str = "0.2ms"
    state_dir: str = ""
    cpus: int = 4
    nodes: list[Node] = field(default_factory=list)
    delay_applied: bool = False  # set by `up`: False where the kernel has no netem (the rate still holds)
    ray: bool = False  # set by `up`: Ray runs on the nodes

    def __post_init__(self):
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise SimError(f"node roles must be among {ROLES}; got {self.roles}")
        if len(self.name) > 8 or not self.name.isalnum():
            raise SimError(f"cluster name {self.name!r}: up to 8 letters or digits (interface names are short)")
        self.state_dir = self.state_dir or f"/tmp/{self.name}"
        net = ipaddress.ip_network(f"10.77.{self.subnet}.0/24")
        if len(self.roles) > 250:
            raise SimError("at most 250 nodes")
        self.nodes = self.nodes or [
            Node(i, role, f"{self.name}-n{i}", str(net.network_address + i + 1), self.cpus * (2 if i == 0 else 1))
            for i, role in enumerate(self.roles)
        ]
        self.nodes = [n if isinstance(n, Node) else Node(**n) for n in self.nodes]

    # ------------------------------------------------------------ paths and state

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    # Files in the state folder: the job's token, Ray's, and the TLS certificate and key of every node.
    token_file = property(lambda self: self.state / "token")
    ray_token_file = property(lambda self: self.state / "ray-token")
    cert = property(lambda self: self.state / "cert.pem")
    key = property(lambda self: self.state / "key.pem")

    def save(self) -> None:
        (self.state / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: str) -> SimCluster:
        path = Path(state_dir) / "cluster.json"
        if not path.is_file():
            raise SimError(f"no simulated cluster at {state_dir} (no {path.name})")
        return cls(**json.loads(path.read_text()))

    def env(self) -> dict[str, str]:
        """The environment of every Ray process and client of this cluster."""
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
            "TOKENIZERS_PARALLELISM": "false",
            "PRORANK_SIM": self.name,
        }

    # ------------------------------------------------------------ network

    def veth(self, node: Node) -> str:
        """The switch-side end of a node's link (in the switch namespace)."""
        return f"{self.name}p{node.index}"

    def up(self, ray: bool = True, wait: float = 180) -> SimCluster:
        """Namespaces, links, shaping, secrets, then Ray on every node. Tears down what it made on failure."""
        if self.state.exists() and (self.state / "cluster.json").exists():
            raise SimError(f"a simulated cluster is already up at {self.state}: run `down` first")
        self.state.mkdir(parents=True, exist_ok=True)
        self.delay_applied = bool(self.delay) and has_netem()
        self.save()
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "set", "lo", "up")
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for node in self.nodes:
                self._add_node(node)
            self._secrets()
            if ray:
                self.ray = True
                self.save()
                self.start_ray(wait)
        except BaseException:
            self.down()
            raise
        return self

    def _add_node(self, node: Node) -> None:
        ns, peer = node.ns, self.veth(node)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        inner = f"{self.name}i{node.index}"
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", inner, "netns", ns, "name", "eth0")
        sh("ip", "link", "set", peer, "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", peer, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        self._shape(ns, "eth0")  # what the node sends
        self._shape(self.switch, peer)  # what the node receives

    def _shape(self, ns: str, dev: str) -> None:
        """A token bucket at the link rate; under it the delay (netem), where the kernel has sch_netem."""
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev]
        bucket = ["tbf", "rate", self.rate, "burst", "256kb", "latency", "100ms"]
        if self.delay_applied:
            sh(*tc, "root", "handle", "1:", "netem", "delay", self.delay, "limit", "100000")
            sh(*tc, "parent", "1:1", "handle", "10:", *bucket)
        else:
            sh(*tc, "root", "handle", "10:", *bucket)

    def link(self, node: Node | int, up: bool) -> None:
        """Cut (or restore) a node's link at its switch port: the node is partitioned from every other."""
        node = self.nodes[node] if isinstance(node, int) else node
        sh("ip", "-n", self.switch, "link", "set", self.veth(node), "up" if up else "down")

    def _secrets(self) -> None:
        self.token_file.write_text(secrets.token_urlsafe(32))
        self.ray_token_file.write_text(secrets.token_hex(32))
        self_signed(self.cert, self.key, [n.ip for n in self.nodes] + ["127.0.0.1"])
        for path in (self.token_file, self.ray_token_file, self.key):
            path.chmod(0o600)

    # ------------------------------------------------------------ processes

    def popen(self, node: Node | int, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process inside a node's namespace, with the cluster's environment."""
        node = self.nodes[node] if isinstance(node, int) else node
        kwargs.setdefault("env", self.env())
        return subprocess.Popen(["ip", "netns", "exec", node.ns, *argv], **kwargs)

    def run(self, node: Node | int, argv: list[str], timeout: float = STEP_TIMEOUT, **kwargs):
        node = self.nodes[node] if isinstance(node, int) else node
        kwargs.setdefault("env", self.env())
        return subprocess.run(["ip", "netns", "exec", node.ns, *argv], timeout=timeout, **kwargs)

    def _ray_args(self, node: Node) -> list[str]:
        temp = self.state / f"ray{node.index}"  # short: Ray puts Unix sockets under it
        return [
            "--node-ip-address",
            node.ip,
            "--num-cpus",
            str(node.cpus),
            "--resources",
            json.dumps({node.resource: 4 if node.role == "learner" else 1}),
            "--temp-dir",
            str(temp),
            "--object-store-memory",
            str(300 * 2**20),
            "--disable-usage-stats",
        ]

    def start_ray(self, wait: float = 180) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        head = self.head
        out = self.run(
            head,
            [ray, "start", "--head", "--port", str(RAY_PORT), "--include-dashboard=false", *self._ray_args(head)],
            env={**self.env(), **HEALTH_ENV},
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise SimError(f"ray start --head on {head.ns} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        for node in self.nodes[1:]:
            # `--block` stays in the foreground while the node lives; the loop starts it again after Ray
            # declared the node dead (it cannot rejoin under its old id), at most NODE_RESTARTS times.
            start = " ".join([ray, "start", "--block", "--address", self.address, *map(quote, self._ray_args(node))])
            loop = f"for i in $(seq 1 {NODE_RESTARTS}); do {start}; sleep 2; done"
            log = open(self.state / f"node{node.index}.log", "ab")  # noqa: SIM115 - the child keeps it
            self.popen(
                node,
                ["bash", "-c", loop],
                env={**self.env(), **WORKER_ENV},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        self.wait_nodes(len(self.nodes), wait)

    def ray_nodes(self) -> list[dict]:
        """Every node Ray knows (dead ones too): NodeID, NodeManagerAddress (its IP), Alive, and its role
        resources, asked from the head node's namespace."""
        code = (
            "import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
            "print(json.dumps([{'NodeID': n['NodeID'], 'NodeManagerAddress': n['NodeManagerAddress'], "
            "'Alive': n['Alive'], 'roles': [k for k in n['Resources'] if k.endswith('_node')]} "
            "for n in ray.nodes()]))" % self.address
        )
        try:
            out = self.run(self.head, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise SimError(f"no answer from the Ray head at {self.address} in 60 s") from None
        if out.returncode:
            raise SimError(f"cannot list the Ray nodes: {out.stderr[-1000:]}")
        return json.loads([x for x in out.stdout.splitlines() if x.startswith("[")][-1])

    def alive_nodes(self) -> dict[str, int]:
        """Live Ray nodes by role."""
        found = [k for n in self.ray_nodes() if n["Alive"] for k in n["roles"]]
        return {role: found.count(f"{role}_node") for role in ROLES}

    def wait_nodes(self, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            alive = self.alive_nodes()
            if sum(alive.values()) >= count:
                return
            if time.monotonic() > deadline:
                raise SimError(f"only {alive} Ray nodes alive after {timeout:.0f} s, want {count}")
            time.sleep(2)

    # ------------------------------------------------------------ teardown

    def down(self) -> list[str]:
        """Every process in the cluster's namespaces, the namespaces (and so their links) and the state
        folder, whatever state `up` reached. Returns what it could not remove (empty when all went)."""
        left = []
        namespaces = [n.ns for n in self.nodes] + [self.switch]
        existing = set(netns_list())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for ns in namespaces if ns in existing for p in netns_pids(ns)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline and any(netns_pids(ns) for ns in namespaces if ns in existing):
                time.sleep(0.5)
        for ns in namespaces:
            if ns in existing and subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode:
                left.append(f"namespace {ns}")
        for node in self.nodes:  # links are removed with their namespace; a half-made one may be left here
            for dev in (f"{self.name}i{node.index}", self.veth(node)):
                if subprocess.run(["ip", "link", "show", dev], capture_output=True).returncode == 0:
                    subprocess.run(["ip", "link", "del", dev], capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)
        return left

    # ------------------------------------------------------------ a job on it

    def train_overrides(self) -> list[str]:
        """Dotted overrides that put a job's roles on this cluster's nodes, over its token and TLS."""
        tls = [
            f"{s}.{k}={v}"
            for s in ("reward", "weights")
            for k, v in (("tls_cert", self.cert), ("tls_key", self.key), ("tls_ca", self.cert))
        ]
        return [
            "actors.resources={actor_node: 1}",
            "learner.resources={learner_node: 1}",
            "reward.resources={reward_node: 1}",
            f"reward.replicas={self.roles.count('reward') or 1}",
            f"actors.num_actors={self.roles.count('actor') or 1}",
            "reward.host=0.0.0.0",
            "weights.host=0.0.0.0",
            "weights.relay_host=0.0.0.0",
            f"reward.token_file={self.token_file}",
            f"weights.token_file={self.token_file}",
            *tls,
        ]
