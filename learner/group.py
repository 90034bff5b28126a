"""The learner as the driver sees it: K DeepSpeed ranks (Ray actors) that step together.

`step(batch)` splits a global batch across the ranks, runs one optimizer step of the learner's objective
(learner/objectives.py: GRPO in stage 1, the ranking losses in stage 2), and reduces the ranks' statistics
into the step's metrics. Rank 0 runs the learner's end of the weight transport it is given
(`serve_weights`), and `publish(version)` makes the weights a version there, read from the parameters in
place; the weights never pass through the driver. `save`/`load` write and read atomic checkpoints, each
with a plain Hugging Face model folder beside DeepSpeed's state.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from prorank.learner.objectives import Objective
from prorank.learner.rank import LearnerRank, rank_threads
from prorank.run import checkpoints
from prorank.run.weight_transport import WeightSender
from prorank.settings.config import StageLearnerConfig

# What a rank's train_step reports that is the same on every rank (or, for seconds, in lockstep): rank 0's.
RANK0_FIGURES = ("grad_norm", "lr", "forward_seconds", "backward_seconds", "optimizer_seconds")


class LearnerError(RuntimeError):
    """A learner rank failed (died, or raised); the message names the rank, its node and the call."""


def rank_failure(where: str, method: str, err: Exception) -> LearnerError:
    """The error of a rank (`where`: "rank 0 on node ...") that failed in `method`. A RayTaskError's text is
    the rank's traceback: its first line says where, its last the cause ("OSError: [Errno 28] No space left
    on device: '...'"), and both reach the console."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    cause = lines[0][:300] if lines else ""
    if len(lines) > 1:
        cause += f" ... {lines[-1][:500]}"
    return LearnerError(f"learner {where} failed in {method}: {type(err).__name__}: {cause}")


class LearnerGroup:
    def __init__(
        self,
        model_path: str,
        cfg: StageLearnerConfig,
        objective: Objective,
        sender: WeightSender | None = None,
        adapter: str | None = None,
    ):
        """`adapter`: with `cfg.lora`, the peft folder of the adapter to go on training (else a fresh one)."""
        if objective.batch_size % (cfg.num_ranks * objective.micro_batch):
            raise ValueError(
                f"a step of {objective.batch_size} is not a multiple of num_ranks * micro-batch "
                f"({cfg.num_ranks} * {objective.micro_batch})"
            )
        self.cfg, self.model_path, self.objective = cfg, model_path, objective
        remote = ray.remote(LearnerRank).options(
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            resources=cfg.resources or None,
            max_restarts=0,
            # Ray starts a worker with OMP_NUM_THREADS = its num_cpus (1 here); torch.set_num_threads raises
            # torch's own count later, but a rank started with 1 ran its score steps 8% slower on 2 cores
            # than one started with its real thread count (bench/score_step.py).
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(rank_threads(cfg))}},
        )
        self.ranks = [
            remote.remote(r, cfg.num_ranks, model_path, cfg, objective, sender if r == 0 else None, adapter)
            for r in range(cfg.num_ranks)
        ]
        address, port = ray.get(self.ranks[0].master_address.remote())
        self.where = [f"rank {r}" for r in range(cfg.num_ranks)]  # how errors name a rank, until its node is known
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        self.where = [f"rank {r} on node {ips.get(node, '?')} ({node[:8]})" for r, node in enumerate(self._all("node"))]
        self._all("setup", address, port)
        self.steps = 0

    def _all(self, method: str, *args, per_rank: list[tuple] | None = None) -> list:
        """`method` on every rank, with `args` (or each rank's own `per_rank` args), answers in rank order.
        Fails fast: when one rank dies or raises, the others may wait in a collective for it until the
        process group's timeout, so the first failure ends the call with an error naming that rank and node."""
        refs = [getattr(rank, method).remote(*(per_rank[r] if per_rank else args)) for r, rank in enumerate(self.ranks)]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                raise self._failure(refs.index(done[0]), method, err) from err
        return ray.get(refs)

    def _on_rank0(self, method: str, *args):
        """`method` on rank 0 alone (no collective), failing like `_all`."""
        try:
            return ray.get(getattr(self.ranks[0], method).remote(*args))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            raise self._failure(0, method, err) from err

    def _failure(self, rank: int, method: str, err: Exception) -> LearnerError:
        return rank_failure(self.where[rank], method, err)

    def step(self, batch: list) -> dict[str, float]:
        """One optimizer step on the objective's `batch_size` items (GRPO groups, or queries); its metrics."""
        if len(batch) != self.objective.batch_size:
            raise ValueError(f"a learner step takes {self.objective.batch_size} items, got {len(batch)}")
        normalizer = self.objective.normalizer(batch)
        start = time.perf_counter()
        k = len(self.ranks)
        parts = self._all("train_step", per_rank=[(batch[r::k], normalizer) for r in range(k)])
        self.steps += 1
        seconds = time.perf_counter() - start
        summed = {key: sum(p[key] for p in parts) for key in parts[0] if key not in (*RANK0_FIGURES, "seconds")}
        # The optimizer's figures are the same on every rank (one global step), and the ranks step in
        # lockstep: rank 0's, with its seconds in the forward, backward and optimizer step.
        return {
            **self.objective.metrics(batch, summed, seconds),
            **{key: parts[0][key] for key in RANK0_FIGURES},
            "step_seconds": seconds,
        }

    def nodes(self) -> list[str]:
        """The Ray node id each rank runs on."""
        return self._all("node")

    def full_weights(self) -> tuple[dict, float]:
        """A copy of the full state dict (named CPU tensors) from rank 0, and the seconds it took."""
        start = time.perf_counter()
        states = self._all("full_state_dict")
        return states[0], time.perf_counter() - start

    def memory(self) -> list[dict[str, float]]:
        """Each rank's peak RSS and optimizer state bytes, and its trainable parameters (learner/rank.py)."""
        return self._all("memory")

    def serve_weights(self) -> str:
        """Start the weight sender on rank 0; its address (the node's IP for a wildcard bind)."""
        return self._on_rank0("serve_weights")

    def publish(self, version: int, receivers: list[str] | None = None) -> dict[str, float]:
        """Publish the current weights as `version` on rank 0's server; rank 0's figures (seconds, bytes,
        changed bytes and tensors)."""
        return self._all("publish", version, receivers)[0]

    def save(self, root: str | Path, driver_state: dict | None = None) -> Path:
        """Write a checkpoint of this step under `root` atomically (prorank/run/checkpoints.py: a crash at any
        point leaves the previous one and LATEST intact). Its model/ holds the full weights as a model
        folder transformers loads (rank 0 writes it); with LoRA merged, and adapter/ the adapter alone."""
        tmp = checkpoints.start(root, self.steps)
        self._all("save", str(tmp))
        self._all("save_model", str(tmp / checkpoints.MODEL), str(tmp / checkpoints.ADAPTER))
        return checkpoints.commit(root, tmp, self.steps, driver_state or {})

    def load(self, root: str | Path) -> dict:
        """Restore the newest intact checkpoint (the one LATEST points to unless it is damaged: then the
        one before, with a warning naming the damage); returns the driver state saved with it."""
        folder = checkpoints.resume_point(root)
        if folder is None:
            raise FileNotFoundError(f"no checkpoint under {root} (missing {Path(root) / checkpoints.LATEST})")
        checkpoints.set_aside_newer(root, folder)
        self._all("load", str(folder))
        state = checkpoints.read_state(folder)
        state.pop("files", None)  # the checkpoint's own file list, not the driver's
        self.steps = state["steps"]
        return state

    def shutdown(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
