"""Full fine-tuning against LoRA (`learner.lora`, r=16 on every linear layer) on SmolLM2-135M, in one run.

    .venv/bin/python -m bench.lora --data ../shared/data/scifact --model models/SmolLM2-135M-Instruct \
        [--quality-minutes 8] [--json docs/results/lora.json]

1. The learner (Ray + DeepSpeed ZeRO-2, 1 rank x all cores, float32) on score steps of one SciFact query
   (a positive and 15 BM25 hard negatives): seconds a step, the rank's peak RSS, its optimizer state bytes
   and trainable parameters.
2. Weight sync into one live vLLM actor over gRPC, per version after a step: bytes on the wire, the
   learner's publish seconds, and the actor's seconds to pull, verify and apply; then the actor's scoring
   rate (the dev evaluation's work) with what it serves, on SciFact pairs (64; 16 for vLLM's LoRA). Full
   weights are reloaded in place; a LoRA version is served merged (`actors_serve: merged`, the CPU default:
   added to the actor's base weights, which are reloaded) or as vLLM's LoRA (`actors_serve: adapter`).
3. With --quality-minutes M: the same `prorank train` score-stage job (configs/scifact-cpu.yaml's recipe
   from zero-shot SmolLM2, all layers, dev nDCG@10 on 30 held-out training queries' BM25 top 10) twice:
   full fine-tuning (score.lr 3e-5, the recipe's) and LoRA (score.lr 3e-4, LoRA's usual 10x), each
   stopped by `train.max_hours` after M minutes of job clock. One run of each: a difference within a few
   points is noise at this size.

Every ratio is LoRA over full fine-tuning, measured in this run. Nothing else should run meanwhile.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT, data_model_parser, recipe, write_config
from bench.score_step import make_groups
from prorank.corpus.data import load_dataset
from prorank.learner.objectives import RankingObjective
from prorank.model.prompt import document_text
from prorank.settings.config import (
    ActorConfig,
    DataConfig,
    LoraSettings,
    PromptConfig,
    SamplingConfig,
    StageLearnerConfig,
    WeightSyncConfig,
)
from prorank.settings.stage_config import RankingLoss
from prorank.weights.transport import GrpcTransport

LORA = {"r": 16, "alpha": 32}
TOKEN = "bench-lora"


def learner_and_sync(model: str, data: str, lora: dict | None, steps: int, versions: int) -> dict[str, dict]:
    """Sections 1 and 2 for one way of training (lora None: full fine-tuning): {serving: figures}, one
    entry for full weights, two for LoRA (actors serving it merged, and as vLLM's LoRA)."""
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    cores = os.cpu_count() or 1
    groups, _ = make_groups(data, model, steps + 1, 15, 192)
    settings = LoraSettings(**lora) if lora else None
    cfg = StageLearnerConfig(
        num_ranks=1,
        threads=cores,
        num_cpus=1,
        lr=1e-5,
        groups_per_step=1,
        micro_batch_groups=1,
        beta=0.0,
        lora=settings,
    )
    mix = RankingLoss(weights={"contrastive": 1.0, "pairwise": 0.0, "pointwise": 0.0}, temperature=1.0)
    sender = GrpcTransport(TOKEN, WeightSyncConfig()).sender()
    learner = LearnerGroup(model, cfg, RankingObjective(mix, 1, 1), sender=sender)
    figures = {}
    try:
        learner.step([groups[0]])  # warm-up
        seconds = []
        for g in groups[1 : steps + 1]:
            start = time.perf_counter()
            learner.step([g])
            seconds.append(time.perf_counter() - start)
        learned = {"step_seconds": statistics.median(seconds), **learner.memory()[0]}
        address = learner.serve_weights()
        version = 0
        for serve in ["merged", "adapter"] if settings else ["full"]:
            served = settings.model_copy(update={"actors_serve": serve}) if settings else None
            receivers = GrpcTransport(TOKEN, WeightSyncConfig(relay=False), served).receiver
            figures[serve] = {
                **learned,
                **actor_sync(
                    learner,
                    address,
                    receivers,
                    model,
                    data,
                    groups,
                    version,
                    versions,
                    16 if serve == "adapter" else 64,
                ),
            }
            version += versions
    finally:
        learner.shutdown()
    return figures


def actor_sync(
    learner, address: str, receivers, model: str, data: str, groups, version: int, versions: int, pairs: int
) -> dict:
    """Versions after `version` from `learner` into one new vLLM actor, then its scoring rate on `pairs`."""
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    from prorank.actors.pool import ActorPool  # noqa: PLC0415 pulls ray, which importing this module does not

    pool = ActorPool(
        model,
        ActorConfig(num_actors=1, num_cpus=1, max_model_len=512, kv_cache_gib=1),
        SamplingConfig(group_size=1, max_tokens=1),
        PromptConfig(max_length=192),
        receivers,
    ).start()
    try:
        sync = []
        for v in range(version + 1, version + versions + 1):
            learner.step([groups[v % len(groups)]])
            published = learner.publish(v, pool.receiver_names())
            (answer,) = pool.sync_weights(address, v).values()
            if not answer["applied"]:
                raise RuntimeError(f"version {v} was not applied: {answer['error']}")
            sync.append(
                {"bytes": answer["bytes"], "publish_seconds": published["seconds"], "actor_seconds": answer["seconds"]}
            )
        ds = load_dataset(DataConfig(path=data, split="train"))
        qid = ds.query_ids[0]
        texts = [(ds.queries[qid], document_text(d.title, d.text)) for d in list(ds.corpus.values())[:pairs]]
        for _ in range(2):  # the second call: the first may pay for activating the adapter
            ref, _ = pool.score(texts)
            rate = len(texts) / ray.get(ref)["seconds"]
    finally:
        pool.shutdown()
    later = sync[1:] or sync  # the first version pays one-off costs (connections, reading the base to merge into)
    return {
        "sync_bytes": statistics.fmean(s["bytes"] for s in later),
        "publish_seconds": statistics.fmean(s["publish_seconds"] for s in later),
        "actor_sync_seconds": statistics.fmean(s["actor_seconds"] for s in later),
        "actor_pairs_per_second": rate,
        "versions": sync,
    }


def quality_job(model: str, data: str, lora: dict | None, minutes: float, out: Path) -> dict:
    """Section 3 for one mode: a score-stage job stopped after `minutes` of job clock; its dev figures."""
    cfg = recipe("scifact-cpu", data, model)
    cfg["train"].update(
        stages=["score"],
        max_hours=minutes / 60,
        dev_queries=30,
        dev_depth=10,
        output_dir=str(out),
        job_name=f"benchlora{os.getpid()}",
    )
    cfg["score"].update(
        steps=1000,
        warmup_steps=3,
        dev_every=0,
        checkpoint_every=0,
        sync_every=1000,
        wait_for_actors=True,
        lr=3e-4 if lora else 3e-5,
    )
    cfg["learner"]["trainable_layers"] = None  # every layer, as LoRA adapts every layer's linear maps
    if lora:
        cfg["learner"]["lora"] = lora
    path = write_config(cfg, out)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "prorank.driver.cli", "train", "--config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=minutes * 60 + 1800,
    )
    if done.returncode:
        kind = "LoRA" if lora else "full"
        raise RuntimeError(f"the {kind} job failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [m for m in lines if "dev/ndcg@10" in m]
    steps = max(m["step"] for m in lines)
    return {
        "dev_ndcg10_before": dev[0]["dev/ndcg@10"],
        "dev_ndcg10_after": dev[-1]["dev/ndcg@10"],
        "dev_bm25_ndcg10": json.loads((out / "summary.json").read_text())["dev_bm25"],
        "steps": steps,
        "wall_hours": max(m.get("time/wall_hours", 0.0) for m in lines),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = data_model_parser(__doc__)
    ap.add_argument("--steps", type=int, default=4, help="timed score steps per mode (after one warm-up)")
    ap.add_argument("--versions", type=int, default=3, help="weight versions synced per mode")
    ap.add_argument("--quality-minutes", type=float, default=0.0, help="job clock of each quality job (0: skip)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        modes = {
            **learner_and_sync(args.model, args.data, None, args.steps, args.versions),
            **learner_and_sync(args.model, args.data, LORA, args.steps, args.versions),
        }
    finally:
        ray.shutdown()
    report = {"model": args.model, "lora": LORA, "cores": os.cpu_count(), "modes": modes, "ratios": {}}
    print(
        f"{'':28s} {'full':>11s} {'LoRA merged':>12s} {'LoRA adapter':>12s} {'merged/full':>11s} {'adapter/full':>12s}"
    )
    for key in (
        "step_seconds",
        "peak_rss_bytes",
        "optimizer_state_bytes",
        "trainable_parameters",
        "sync_bytes",
        "publish_seconds",
        "actor_sync_seconds",
        "actor_pairs_per_second",
    ):
        full, merged, adapter = (modes[m][key] for m in ("full", "merged", "adapter"))
        report["ratios"][key] = {"merged": merged / full, "adapter": adapter / full}
        print(
            f"{key:28s} {full:11.4g} {merged:12.4g} {adapter:12.4g} {merged / full:11.3f} {adapter / full:12.3f}",
            flush=True,
        )
    if args.quality_minutes:
        with tempfile.TemporaryDirectory() as tmp:
            report["quality"] = {
                name: quality_job(args.model, args.data, lora, args.quality_minutes, Path(tmp) / name)
                for name, lora in (("full", None), ("lora", LORA))
            }
        for name, q in report["quality"].items():
            print(
                f"{name}: {q['steps']} steps in {q['wall_hours'] * 60:.1f} min of job clock, dev nDCG@10 "
                f"{q['dev_ndcg10_before']:.4f} -> {q['dev_ndcg10_after']:.4f} (BM25 {q['dev_bm25_ndcg10']:.4f})"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
