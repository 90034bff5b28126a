"""`python -m deploy.sim`: the simulated cluster's commands (deploy/sim/simcluster.sh calls these)."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from deploy.sim.cluster import ROOT, SimCluster
from deploy.sim.netns import SimError, can_create_namespaces

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="A multi-node Ray cluster on this machine: network namespaces on shaped links.",
)
StateOpt = Annotated[str, typer.Option("--state", help="The cluster's state folder.")]
DEFAULT_STATE = "/tmp/prksim"


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _terminate(*_):  # SIGTERM during `up` tears down like Ctrl-C
    raise KeyboardInterrupt


@app.command()
def up(
    nodes: Annotated[
        str, typer.Option(help="Roles of nodes 0, 1, ...: learner, reward or actor; node 0 is the Ray head.")
    ] = "learner,reward,actor,actor",
    rate: Annotated[str, typer.Option(help="Each link's rate (tc units: 800mbit, 1gbit).")] = "800mbit",
    delay: Annotated[str, typer.Option(help="Each link's one-way delay (tc units: 0.2ms).")] = "0.2ms",
    cpus: Annotated[int, typer.Option(help="Logical CPUs each Ray node offers (the head twice that).")] = 4,
    subnet: Annotated[int, typer.Option(help="Third byte of the private /24 10.77.<subnet>.0.")] = 77,
    name: Annotated[str, typer.Option(help="Prefix of the namespaces and links (<= 8 letters/digits).")] = "prksim",
    state: StateOpt = DEFAULT_STATE,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="Only the network, no Ray.")] = False,
) -> None:
    """Bring the cluster up: namespaces, bridge, shaped links, token and TLS certificate, Ray on every node."""
    if why := can_create_namespaces():
        _fail(SimError(why))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cluster = SimCluster(name, nodes.split(","), subnet, rate, delay, state, cpus).up(ray=not no_ray)
    except (SimError, OSError) as err:
        _fail(err)
    _print_status(cluster)


@app.command()
def down(state: StateOpt = DEFAULT_STATE) -> None:
    """Stop every process in the cluster's namespaces and remove them, their links and the state folder."""
    try:
        cluster = SimCluster.load(state)
    except SimError as err:
        typer.echo(f"nothing to tear down: {err}", err=True)
        return
    left = cluster.down()
    if left:
        _fail(SimError(f"could not remove: {', '.join(left)}"))
    typer.echo(f"cluster {cluster.name}: down")


@app.command()
def status(state: StateOpt = DEFAULT_STATE) -> None:
    """The nodes, their addresses and roles, and the live Ray nodes by role."""
    try:
        _print_status(SimCluster.load(state))
    except SimError as err:
        _fail(err)


@app.command()
def link(
    node: int, setting: Annotated[str, typer.Argument(help="up or down")], state: StateOpt = DEFAULT_STATE
) -> None:
    """Cut (down) or restore (up) a node's link: a network partition of that node."""
    if setting not in ("up", "down"):
        _fail(ValueError(f"link setting must be up or down, not {setting!r}"))
    try:
        SimCluster.load(state).link(node, setting == "up")
    except (SimError, IndexError) as err:
        _fail(err)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: str,
    state: StateOpt = DEFAULT_STATE,
    dry_run: Annotated[bool, typer.Option(help="Print the command only.")] = False,
) -> None:
    """`prorank train --config CONFIG` from the head node, joined to the cluster, with every role on its
    node type and the services on the node addresses with token and TLS; extra args go to prorank train."""
    try:
        cluster = SimCluster.load(state)
    except SimError as err:
        _fail(err)
    argv = [
        sys.executable,
        "-m",
        "prorank.driver.cli",
        "train",
        "--config",
        config,
        "--address",
        cluster.address,
        *ctx.args,
        *cluster.train_overrides(),
    ]
    if dry_run:
        typer.echo(" ".join(argv))
        return
    proc = cluster.popen(0, argv, cwd=ROOT)
    try:
        raise typer.Exit(proc.wait())
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        raise typer.Exit(proc.wait(timeout=120)) from None


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_command(ctx: typer.Context, node: int, state: StateOpt = DEFAULT_STATE) -> None:
    """Run a command inside node NODE's namespace with the cluster's environment (Ray token included)."""
    try:
        cluster = SimCluster.load(state)
    except SimError as err:
        _fail(err)
    raise typer.Exit(cluster.popen(node, ctx.args, cwd=ROOT).wait())


def _print_status(cluster: SimCluster) -> None:
    delay = f"+ {cluster.delay} delay" if cluster.delay_applied else "(no delay: this kernel has no sch_netem)"
    typer.echo(
        f"cluster {cluster.name}: Ray at {cluster.address}, links {cluster.rate} {delay} each way, "
        f"state in {cluster.state}"
    )
    for node in cluster.nodes:
        typer.echo(f"  node {node.index}  {node.ns:<14} {node.ip:<14} {node.role}")
    if not cluster.ray:
        return
    try:
        typer.echo(f"live Ray nodes by role: {cluster.alive_nodes()}")
    except SimError as err:
        typer.echo(f"Ray: {err}")


if __name__ == "__main__":
    app()
