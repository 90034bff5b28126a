"""The learner as the driver sees it: K DeepSpeed ranks (Ray actors) that step together.

`step(groups)` (GRPO) and `score_step(groups)` (stage 2) split a global batch across the ranks, run one
optimizer step, and reduce the ranks' statistics into the step's metrics. Rank 0 runs the weight
server (`serve_weights`), and `publish(version)` makes the weights a version there, read from the
parameters in place; the weights never pass through the driver. `save`/`load` write and read atomic
checkpoints, each with a plain Hugging Face model folder beside DeepSpeed's state.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import ray

from learner.rank import LearnerRank
from learner.step import step_normalizer
from prorank.config import LearnerConfig, WeightSyncConfig
from prorank.rollout import RankingGroup, ScoredGroup

LATEST = "LATEST"


class LearnerError(RuntimeError):
    """A learner rank failed (died, or raised); the message names the rank, its node and the call."""


class LearnerGroup:
    def __init__(self, model_path: str, cfg: LearnerConfig, temperature: float = 1.0, ranking: dict | None = None):
        self.cfg, self.model_path = cfg, model_path
        remote = ray.remote(LearnerRank).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None, max_restarts=0,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
        self.ranks = [remote.remote(r, cfg.num_ranks, model_path, cfg, temperature, ranking)
                      for r in range(cfg.num_ranks)]
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
        cause = str(err).strip().splitlines()[0][:300]
        return LearnerError(f"learner {self.where[rank]} failed in {method}: {type(err).__name__}: {cause}")

    def _train(self, groups: list, normalizer: float) -> tuple[list[dict], dict[str, float], float]:
        if len(groups) != self.cfg.groups_per_step:
            raise ValueError(f"a learner step takes {self.cfg.groups_per_step} groups, got {len(groups)}")
        start = time.perf_counter()
        k = len(self.ranks)
        parts = self._all("train_step", per_rank=[(groups[r::k], normalizer) for r in range(k)])
        self.steps += 1
        summed = {key: sum(p[key] for p in parts) for key in parts[0] if key not in ("grad_norm", "lr", "seconds")}
        return parts, summed, time.perf_counter() - start

    def score_step(self, groups: list[RankingGroup]) -> dict[str, float]:
        """One stage-2 optimizer step on `cfg.groups_per_step` queries; returns the step's metrics."""
        parts, summed, seconds = self._train(groups, float(len(groups)))
        return {**summed, "grad_norm": parts[0]["grad_norm"], "lr": parts[0]["lr"], "step_seconds": seconds,
                "prompt_tokens_per_second": summed["prompt_tokens"] / seconds}

    def step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        """One GRPO optimizer step on `cfg.groups_per_step` groups; returns the step's metrics."""
        parts, summed, seconds = self._train(groups, step_normalizer(groups, self.cfg))
        rewards = [r for g in groups for r in g.rewards]
        metrics = {
            "loss": summed["loss"],
            "kl": summed.get("kl", 0.0),
            "clip_fraction": summed["clipped"],
            "truncated_fraction": summed.get("truncated", 0.0),
            "ratio_mean": summed["ratio"],
            "entropy": summed["entropy"],
            "mismatch_kl": summed["mismatch_kl"],
            "grad_norm": parts[0]["grad_norm"],
            "lr": parts[0]["lr"],
            "reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards),
            "zero_variance_groups": sum(len(set(g.rewards)) == 1 for g in groups) / len(groups),
            "tokens_per_second": summed["tokens"] / seconds,
            "prompt_tokens": summed["prompt_tokens"],
            "step_seconds": seconds,
        }
        return metrics

    def nodes(self) -> list[str]:
        """The Ray node id each rank runs on."""
        return self._all("node")

    def full_weights(self) -> tuple[dict, float]:
        """A copy of the full state dict (named CPU tensors) from rank 0, and the seconds it took."""
        start = time.perf_counter()
        states = self._all("full_state_dict")
        return states[0], time.perf_counter() - start

    def serve_weights(self, token: str, cfg: WeightSyncConfig) -> str:
        """Start the weight server on rank 0; its address (the node's IP for a wildcard bind)."""
        return self._on_rank0("serve_weights", token, cfg)

    def publish(self, version: int, receivers: list[str] | None = None) -> dict[str, float]:
        """Publish the current weights as `version` on rank 0's server; rank 0's figures (seconds, bytes,
        changed bytes and tensors)."""
        return self._all("publish", version, receivers)[0]

    def save(self, root: str | Path, driver_state: dict | None = None) -> Path:
        """Write a checkpoint to root/step-N atomically: into a temporary folder, then one rename, then
        LATEST is replaced. A crash at any point leaves the previous checkpoint and LATEST intact.
        step-N/model holds the full weights as a model folder transformers loads (rank 0 writes it)."""
        root = Path(root)
        final = root / f"step-{self.steps}"
        tmp = root / f".tmp-step-{self.steps}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._all("save", str(tmp))
        (tmp / "driver.json").write_text(json.dumps({"steps": self.steps, **(driver_state or {})}))
        self._all("save_model", str(tmp / "model"))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        pointer.replace(root / LATEST)
        return final

    def load(self, root: str | Path) -> dict:
        """Restore the checkpoint LATEST points to; returns the driver state saved with it."""
        root = Path(root)
        latest = root / LATEST
        if not latest.is_file():
            raise FileNotFoundError(f"no checkpoint under {root} (missing {latest})")
        folder = root / latest.read_text().strip()
        self._all("load", str(folder))
        state = json.loads((folder / "driver.json").read_text())
        self.steps = state["steps"]
        return state

    def shutdown(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
