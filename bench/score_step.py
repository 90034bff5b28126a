"""Stage-2 score steps per second, on real SciFact queries (a positive + BM25 hard negatives each):
the plain float32 torch loop of issue 14's learner against the levers of the quality recipe, in one run.

1. The machine's GEMM rate, float32 and bf16, on the shapes of SmolLM2's MLP: the ceiling.
2. One process, plain torch: a whole optimizer step (forward, backward, AdamW) in float32, then with
   bf16 autocast (`learner.mixed_precision`), without the shared prefix (each prompt whole, padded), and
   with all layers trained instead of the top N.
3. The real learner (Ray + DeepSpeed ZeRO-2): 2 ranks x 1 thread (issue 14) against 1 rank x 2 threads,
   float32 and bf16 autocast, one query per rank per step.

Each line: pairs (query, candidate) per second, its ratio to the float32 torch loop, and the achieved
FLOP/s as a fraction of the measured bf16 GEMM rate. Nothing else should run on the machine meanwhile.

    .venv/bin/python -m bench.score_step --data ../shared/data/scifact --model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench import data_model_parser
from prorank.batches import PromptSampler, RankingSampler
from prorank.bm25 import bm25_search
from prorank.config import BM25Config, DataConfig, StageLearnerConfig, TrainConfig
from prorank.data import load_dataset
from prorank.learner.objectives import RankingObjective
from prorank.learner.precision import forward_precision
from prorank.learner.rank import freeze_below
from prorank.learner.score_step import score_micro_batch_loss
from prorank.models import load_tokenizer
from prorank.prompt import PromptBuilder
from prorank.scoring import common_prefix_length
from prorank.stage_config import RankingLoss, ScoreConfig, WarmupConfig


def gemm_rate(dtype: torch.dtype, m: int = 4096, k: int = 576, n: int = 1536, repeats: int = 20) -> float:
    """FLOP/s of [m, k] @ [k, n] in `dtype` (the best of `repeats`)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def cpu_kind() -> str:
    """The CPU's model name and its bf16 units: the figures differ by machine kind (AMX or not)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    units = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in info.split()]
    return f"{name} ({', '.join(units) or 'no bf16 units'})"


def step_flops(model, groups, trainable: int | None) -> float:
    """Matrix-product FLOPs of one step over `groups`: 2 per weight per token forward through every layer,
    4 more backward through the trained ones (weight and input gradients); embeddings and the one-position
    vocabulary head left out. Tokens are those computed: the shared prefix once per query."""

    layers = model.get_decoder().layers
    per_layer = sum(p.numel() for p in layers[0].parameters() if p.dim() == 2)
    trained = len(layers) if trainable is None else trainable
    tokens = sum(
        common_prefix_length(g.prompt_ids) + sum(len(p) - common_prefix_length(g.prompt_ids) for p in g.prompt_ids)
        for g in groups
    )
    return tokens * per_layer * (2 * len(layers) + 4 * trained)


def make_groups(data: str, model: str, queries: int, negatives: int, max_length: int):

    ds = load_dataset(DataConfig(path=data, split="train"))
    qids = ds.query_ids[: queries * 4]
    ranking = bm25_search(ds, qids, BM25Config(top_k=30))
    prompts = PromptSampler(ds, ranking, TrainConfig(max_train_queries=len(qids), dev_queries=0), WarmupConfig())
    builder = PromptBuilder(load_tokenizer(model), max_length)
    sampler = RankingSampler(prompts, ranking, ScoreConfig(negatives=negatives, hard_negative_depth=30), builder)
    return sampler.batch(0, queries), builder


def torch_loop_rate(
    model_dir: str, groups, builder, mixed: str, trainable: int | None, steps: int, shared_prefix: bool = True
):
    """(pairs/s, seconds per query) of `steps` AdamW steps, one query each, in this process."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if trainable:
        freeze_below(model, trainable, torch.bfloat16 if mixed == "bf16" else None)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    mix = RankingLoss(weights={"contrastive": 1.0, "pairwise": 0.0, "pointwise": 0.0}, temperature=1.0)
    pad = builder.tokenizer.pad_token_id

    def step(g):
        with forward_precision(mixed == "bf16", "cpu"):
            loss, _ = score_micro_batch_loss(model, [g], 1.0, mix, builder.answer_ids, pad, shared_prefix)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(groups[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(groups[i % len(groups)])
    seconds = (time.perf_counter() - start) / steps
    return model, len(groups[0].prompt_ids) / seconds, seconds


def learner_rate(model_dir: str, groups, ranks: int, threads: int, mixed: str, trainable: int | None, steps: int):
    """(pairs/s, seconds per query) of the real learner: `ranks` DeepSpeed ranks of `threads` threads,
    one query per rank per step."""
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    cfg = StageLearnerConfig(
        num_ranks=ranks,
        threads=threads,
        num_cpus=1,
        mixed_precision=mixed,
        lr=1e-5,
        groups_per_step=ranks,
        micro_batch_groups=1,
        beta=0.0,
        trainable_layers=trainable,
    )
    mix = RankingLoss(weights={"contrastive": 1.0, "pairwise": 0.0, "pointwise": 0.0}, temperature=1.0)
    learner = LearnerGroup(model_dir, cfg, RankingObjective(mix, ranks, 1))
    try:
        batches = [groups[i : i + ranks] for i in range(0, len(groups) - ranks + 1, ranks)]
        learner.step(batches[0])  # warm-up
        start = time.perf_counter()
        for i in range(steps):
            learner.step(batches[i % len(batches)])
        seconds = (time.perf_counter() - start) / (steps * ranks)
    finally:
        learner.shutdown()
    return len(groups[0].prompt_ids) / seconds, seconds


def main(argv: list[str] | None = None) -> dict:
    ap = data_model_parser(__doc__)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--negatives", type=int, default=15)
    ap.add_argument("--max-length", type=int, default=192, help="query + document tokens (prompt.max_length)")
    ap.add_argument("--trainable-layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--skip-learner", action="store_true", help="only the single-process loops (no Ray)")
    ap.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)

    groups, builder = make_groups(args.data, args.model, args.queries, args.negatives, args.max_length)
    peak = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16)}
    cpu = cpu_kind()
    print(
        f"{cpu}, {cores} cores; GEMM [4096x576]@[576x1536]: float32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s ({peak['bfloat16'] / peak['float32']:.2f}x)"
    )
    print(
        f"{len(groups)} queries x {len(groups[0].prompt_ids)} candidates, "
        f"{sum(len(p) for p in groups[0].prompt_ids) / len(groups[0].prompt_ids):.0f} tokens a prompt",
        flush=True,
    )

    top = args.trainable_layers
    rows: dict[str, tuple[float, float, int | None]] = {}
    model, rate, sec = torch_loop_rate(args.model, groups, builder, "no", top, args.steps)
    rows[f"torch loop, float32, top {top} layers"] = (rate, sec, top)
    _, rate, sec = torch_loop_rate(args.model, groups, builder, "bf16", top, args.steps)
    rows[f"torch loop, bf16 autocast, top {top} layers"] = (rate, sec, top)
    _, rate, sec = torch_loop_rate(args.model, groups, builder, "bf16", top, args.steps, shared_prefix=False)
    rows[f"torch loop, bf16 autocast, top {top} layers, no shared prefix"] = (rate, sec, top)
    _, rate, sec = torch_loop_rate(args.model, groups, builder, "bf16", None, args.steps)
    rows["torch loop, bf16 autocast, all layers"] = (rate, sec, None)
    if not args.skip_learner:
        import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            for ranks, threads, mixed in ((2, 1, "no"), (1, 2, "no"), (2, 1, "bf16"), (1, 2, "bf16")):
                rate, sec = learner_rate(args.model, groups, ranks, threads, mixed, top, args.steps)
                name = "float32" if mixed == "no" else "bf16 autocast"
                rows[f"DeepSpeed ZeRO-2, {ranks} rank(s) x {threads} thread(s), {name}, top {top}"] = (rate, sec, top)
        finally:
            ray.shutdown()

    base = next(iter(rows.values()))[0]
    report: dict[str, Any] = {
        "cpu": cpu,
        "cores": cores,
        "gemm_flops": peak,
        "candidates": len(groups[0].prompt_ids),
        "rows": {},
    }
    for name, (rate, sec, trained) in rows.items():
        flops = step_flops(model, groups, trained) / len(groups) / sec
        report["rows"][name] = {
            "pairs_per_second": rate,
            "seconds_per_query": sec,
            "ratio": rate / base,
            "flops": flops,
            "fraction_of_bf16_gemm": flops / peak["bfloat16"],
        }
        print(
            f"{name:62s} {rate:6.2f} pairs/s  {sec:5.2f} s/query  {rate / base:5.2f}x  "
            f"{flops / 1e9:5.0f} GFLOP/s = {flops / peak['bfloat16']:.0%} of bf16 GEMM",
            flush=True,
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
