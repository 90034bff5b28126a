"""Live control of a running job: how many rollout actors it runs, changed while it trains.

The job starts a named Ray actor, `JobControl`, in the `prorank` namespace. `prorank scale actors N
--address ...` connects to the cluster, finds it by the job's name (`train.job_name`) and records N;
the job reads it between steps and grows or shrinks its actor pool (new actors pull the latest weights
before they take work). With `actors.per_node` set, the pool also follows the cluster: per_node actors
for every live node that offers the actors' custom resource, so actors join when such nodes appear.
An explicit `prorank scale` wins over per-node following until the job ends. `prorank stop --job ...`
ends the job after its current step, with a checkpoint and its summary, as if it had reached its last step
(`--preempt`: then exit 143 as on SIGTERM, for a scheduler to retry it with --resume).
"""

from __future__ import annotations

NAMESPACE = "prorank"


def control_name(job_name: str) -> str:
    return f"prorank-control-{job_name}"


class JobControl:
    """The mailbox between `prorank scale` and the job's driver."""

    def __init__(self) -> None:
        self.desired: int | None = None
        self.status: dict = {}
        self.stop = ""  # "", "stop" or "preempt"

    def request_stop(self, preempt: bool = False) -> dict:
        """`prorank stop`: the job ends after its current step, saving its model as at the end. With
        `preempt` (`--preempt`, a Kubernetes preStop hook) it then exits 143, as on SIGTERM, so that the
        scheduler retries it with --resume."""
        self.stop = "preempt" if preempt or self.stop == "preempt" else "stop"
        return self.status

    def stop_requested(self) -> str:
        return self.stop

    def set_actors(self, n: int) -> dict:
        if n < 0:
            raise ValueError(f"cannot scale to {n} actors")
        self.desired = n
        return self.status

    def desired_actors(self) -> int | None:
        return self.desired

    def report(self, status: dict) -> None:
        self.status = status

    def get_status(self) -> dict:
        return self.status


def start_control(job_name: str):
    """The job's control actor; an error if a job of the same name already runs on this cluster."""
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    name = control_name(job_name)
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise RuntimeError(
            f"a job named {job_name!r} already runs on this Ray cluster (actor {name}); set train.job_name"
        )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    # On the driver's node: it lives and dies with the job, not with an actor node cut off the network.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(JobControl)
        .options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0, scheduling_strategy=here)
        .remote()
    )


def find_control(job_name: str):
    """The control actor of the running job `job_name` (Ray must be initialised)."""
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    try:
        return ray.get_actor(control_name(job_name), namespace=NAMESPACE)
    except ValueError:
        raise LookupError(f"no running job named {job_name!r} on this Ray cluster") from None


def nodes_offering(resource: str) -> int:
    """Live nodes of the cluster that offer `resource` (a custom resource naming a node type)."""
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    return sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get(resource, 0) > 0)


def wanted_actors(control, per_node: int, resources: dict[str, float], current: int) -> int:
    """The actor count the job should run now: `prorank scale`'s, else per_node x nodes of the actors'
    node type (when actors.per_node is set), else the current count."""
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    desired = ray.get(control.desired_actors.remote(), timeout=10)
    if desired is not None:
        return desired
    if per_node and resources:  # at least one: it waits for a node to appear rather than failing the job
        return max(1, per_node * nodes_offering(next(iter(resources))))
    return current
