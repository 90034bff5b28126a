"""Stage-2 score steps on real SciFact queries (a positive + BM25 hard negatives each), with the recipe's
settings (configs/scifact-cpu.yaml unless --config: negatives, prompt length, trained layers, learner),
against the machine's GEMM rate measured in the same run.

1. The GEMM rate, float32 and bf16, on the shape of SmolLM2's MLP: the machine's ceiling.
2. The step's own matrix products at their real shapes (forward through every layer, both gradients
   through the trained ones), timed alone on all the cores, as the GEMM rate is: the step's ceiling,
   were everything else (norms, attention, casts, the optimizer) free.
3. One process, plain torch, the learner's kernels (attention, fused AdamW): a whole optimizer step
   (forward, backward, AdamW) in float32, then with bf16 autocast: what the model's arithmetic costs.
4. The real learner (Ray + DeepSpeed ZeRO), one query per rank per step (the job's queries, in its
   order): the recipe's setting (ranks x threads, precision), then the other split of the cores (2 ranks
   x 1 thread, or 1 x 2).

Each line: seconds per query-step, pairs (query, candidate) per second, its ratio to the float32 torch
loop, and the achieved FLOP/s as a fraction of the GEMM rate in the recipe's precision (bf16 where the CPU
has bf16 units, else float32). Nothing else should run on the machine meanwhile.

    .venv/bin/python -m bench.score_step --data ../shared/data/scifact --model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from bench import load_recipe, recipe_parser
from prorank.corpus.batches import PromptSampler, RankingSampler, training_candidates
from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import load_dataset
from prorank.learner.objectives import RankingObjective
from prorank.learner.precision import forward_precision, uses_bf16
from prorank.learner.rank import attention_kernel, freeze_below, rank_threads
from prorank.learner.score_step import score_micro_batch_loss
from prorank.model.models import load_tokenizer, native_bf16, resolve_model
from prorank.model.prompt import PromptBuilder
from prorank.model.scoring import common_prefix_length
from prorank.settings.config import (
    BM25Config,
    DataConfig,
    ProRankConfig,
    StageLearnerConfig,
    TrainConfig,
    WeightSyncConfig,
)
from prorank.settings.stage_config import RankingLoss, ScoreConfig, WarmupConfig
from prorank.weights.transport import GrpcTransport


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
    """Matrix-product FLOPs of one step over `groups`: 2 per (m, k, n) product of `step_matmuls`, i.e. 2 per
    weight per token forward through every layer, 4 more backward through the trained ones; embeddings and
    the one-position vocabulary head left out. Tokens are those computed: the shared prefix once per query."""
    return float(sum(2 * m * k * n for g in groups for m, k, n in step_matmuls(model, g, trainable)))


def step_matmuls(model, group, trainable: int | None) -> list[tuple[int, int, int]]:
    """(m, k, n) of each matrix product of one step on `group`, the ones `step_flops` counts: every layer's
    weights forward on the shared prefix's rows and on the candidates' own rows, and through the trained
    layers backward the input gradient ([rows, out] @ [out, in]) and the weight gradient ([in, rows] @
    [rows, out])."""
    layers = model.get_decoder().layers
    trained = len(layers) if trainable is None else trainable
    prefix = common_prefix_length(group.prompt_ids)
    row_counts = (prefix, sum(len(p) - prefix for p in group.prompt_ids))
    weights = [tuple(p.shape) for p in layers[0].parameters() if p.dim() == 2]  # (out, in) of each Linear
    shapes = []
    for layer in range(len(layers)):
        for out, inp in weights:
            for rows in row_counts:
                shapes.append((rows, inp, out))
                if layer >= len(layers) - trained:
                    shapes += [(rows, out, inp), (inp, rows, out)]
    return shapes


def matmul_seconds(shapes: list[tuple[int, int, int]], dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds to run the products of `shapes` one after another in `dtype` (the best of `repeats`): what
    a step would take if everything but its matrix products were free."""
    operands = [(torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)) for m, k, n in set(shapes)]
    by_shape = {(a.shape[0], a.shape[1], b.shape[1]): (a, b) for a, b in operands}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the kernels up
        start = time.perf_counter()
        for shape in shapes:
            a, b = by_shape[shape]
            a @ b
        best = min(best, time.perf_counter() - start)
    return best


def make_groups(data: str, model: str, queries: int, negatives: int, max_length: int):

    ds = load_dataset(DataConfig(path=data, split="train"))
    qids = ds.query_ids[: queries * 4]
    ranking = bm25_search(ds, qids, BM25Config(top_k=30))
    prompts = PromptSampler(ds, ranking, TrainConfig(max_train_queries=len(qids), dev_queries=0), WarmupConfig())
    builder = PromptBuilder(load_tokenizer(model), max_length)
    sampler = RankingSampler(prompts, ranking, ScoreConfig(negatives=negatives, hard_negative_depth=30), builder)
    return sampler.batch(0, queries), builder


def job_batches(cfg: ProRankConfig, queries: int) -> tuple[list, PromptBuilder]:
    """The first `queries` queries of the score stage of `prorank train` with `cfg`, exactly as its sampler
    draws them (`score.queries_per_step` a step): the same held-out queries, negatives and prompts, so that
    the bench's steps and the job's first steps do the same arithmetic."""
    tc, sc = cfg.train, cfg.score
    ds, ranking = training_candidates(cfg)
    prompts = PromptSampler(ds, ranking, tc, cfg.warmup, cfg.reward.relevance_threshold)
    builder = PromptBuilder.from_config(load_tokenizer(resolve_model(cfg.model)), cfg.prompt)
    sampler = RankingSampler(prompts, ranking, sc, builder, tc.seed, cfg.reward.relevance_threshold)
    size = sc.queries_per_step
    groups = [g for step in range(-(-queries // size)) for g in sampler.batch(step, size)]
    return groups[:queries], builder


PHASES = ("forward_seconds", "backward_seconds", "optimizer_seconds")


def torch_loop_rate(model_dir: str, groups, builder, lc: StageLearnerConfig, mix: RankingLoss, bf16: bool, steps: int):
    """(model, seconds per query) of `steps` AdamW steps, one query each, in this process, with the
    learner's kernels (`lc.attention`, fused AdamW) and frozen layers."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attention_kernel(lc.attention, "cpu")
    )
    if lc.trainable_layers:
        freeze_below(model, lc.trainable_layers, torch.bfloat16 if bf16 else None)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    pad = builder.tokenizer.pad_token_id

    def step(g):
        with forward_precision(bf16, "cpu"):
            loss, _ = score_micro_batch_loss(model, [g], 1.0, mix, builder.answer_ids, pad)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(groups[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(groups[i % len(groups)])
    return model, (time.perf_counter() - start) / steps


def learner_rate(model_dir: str, groups, lc: StageLearnerConfig, sc: ScoreConfig, steps: int) -> tuple[float, dict]:
    """Seconds per query of the real learner with `lc` (its ranks, threads and precision), one query per
    rank per step, and rank 0's mean seconds a step in its forward, backward and optimizer step."""
    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    ranks = lc.num_ranks
    cfg = lc.model_copy(update={"num_cpus": 1, "groups_per_step": ranks, "micro_batch_groups": 1})
    sc = sc.model_copy(update={"queries_per_step": ranks, "micro_batch_queries": 1})
    # As in the job, rank 0 serves the weight transport (idle between syncs): what it runs beside the
    # steps is part of the step time the job logs.
    sender = GrpcTransport(secrets.token_hex(16), WeightSyncConfig()).sender()
    learner = LearnerGroup(model_dir, cfg, RankingObjective.of(sc), sender=sender)
    try:
        learner.serve_weights()
        batches = [groups[i : i + ranks] for i in range(0, len(groups) - ranks + 1, ranks)]
        learner.step(batches[0])  # warm-up
        start = time.perf_counter()
        figures = [learner.step(batches[i % len(batches)]) for i in range(steps)]
        phases: dict[str, Any] = {k: sum(f[k] for f in figures) / steps for k in figures[0] if k in PHASES}
        phases["step_seconds"] = [f["step_seconds"] for f in figures]
        return (time.perf_counter() - start) / (steps * ranks), phases
    finally:
        learner.shutdown()


def main(argv: list[str] | None = None) -> dict:
    ap = recipe_parser(__doc__)
    ap.add_argument("--queries", type=int, default=6, help="the job's first N score steps' queries, cycled")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--skip-learner", action="store_true", help="only the single-process loops (no Ray)")
    ap.add_argument("--recipe-only", action="store_true", help="of the learner, only the recipe's setting")
    ap.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cfg = load_recipe(args)
    sc, lc = cfg.score, cfg.score_learner()
    mix = sc.ranking_loss()
    bf16 = uses_bf16(lc.mixed_precision, "cpu")
    precision = "bfloat16" if bf16 else "float32"

    groups, builder = job_batches(cfg, args.queries)
    peak = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16)}
    cpu = cpu_kind()
    print(
        f"{cpu}, {cores} cores; GEMM [4096x576]@[576x1536]: float32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s ({peak['bfloat16'] / peak['float32']:.2f}x)"
    )
    print(
        f"{len(groups)} queries x {len(groups[0].prompt_ids)} candidates, "
        f"{sum(len(p) for p in groups[0].prompt_ids) / len(groups[0].prompt_ids):.0f} tokens a prompt; "
        f"top {lc.trainable_layers or 'all'} layers trained; the recipe computes in {precision}",
        flush=True,
    )

    rows: dict[str, float] = {}
    phases: dict[str, dict] = {}  # the learner's rank 0: seconds in its forward, backward, optimizer step
    # The ceiling of the recipe's step: its own matrix products at their real shapes, timed alone.
    ceiling = f"the step's matrix products alone, {precision} (a ceiling, not a step)"
    model, rows["torch loop, float32"] = torch_loop_rate(args.model, groups, builder, lc, mix, False, args.steps)
    some = groups[:6]  # per query, a few queries suffice (and 48 would take minutes)
    rows[ceiling] = sum(
        matmul_seconds(step_matmuls(model, g, lc.trainable_layers), getattr(torch, precision)) for g in some
    ) / len(some)
    if native_bf16("cpu") and not args.recipe_only:
        _, rows["torch loop, bf16 autocast"] = torch_loop_rate(args.model, groups, builder, lc, mix, True, args.steps)
    recipe = f"learner, {lc.num_ranks} rank(s) x {rank_threads(lc)} thread(s), {precision} (the recipe)"
    if not args.skip_learner:
        import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

        other = (2, 1) if lc.num_ranks == 1 else (1, cores)
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            rows[recipe], phases[recipe] = learner_rate(args.model, groups, lc, sc, args.steps)
            if not args.recipe_only:
                split = lc.model_copy(update={"num_ranks": other[0], "threads": other[1]})
                name = f"learner, {other[0]} rank(s) x {other[1]} thread(s), {precision}"
                rows[name], phases[name] = learner_rate(args.model, groups, split, sc, args.steps)
        finally:
            ray.shutdown()

    base = rows["torch loop, float32"]
    flops = step_flops(model, groups, lc.trainable_layers) / len(groups)
    report: dict[str, Any] = {
        "cpu": cpu,
        "cores": cores,
        "config": args.config,
        "overrides": args.overrides,
        "gemm_flops": peak,
        "precision": precision,
        "candidates": len(groups[0].prompt_ids),
        "flops_per_query": flops,
        "rows": {},
    }
    for name, sec in rows.items():
        report["rows"][name] = {
            "seconds_per_query": sec,
            "pairs_per_second": len(groups[0].prompt_ids) / sec,
            "ratio": base / sec,
            "flops": flops / sec,
            "fraction_of_gemm": flops / sec / peak[precision],
            **({"rank0_phase_seconds": phases[name]} if name in phases else {}),
        }
        print(
            f"{name:66s} {sec:5.2f} s/query  {len(groups[0].prompt_ids) / sec:5.2f} pairs/s  {base / sec:5.2f}x  "
            f"{flops / sec / 1e9:4.0f} GFLOP/s = {flops / sec / peak[precision]:.0%} of {precision} GEMM",
            flush=True,
        )
        if name in phases:
            print(
                "    rank 0, seconds a step: "
                + ", ".join(f"{k} {v:.2f}" for k, v in phases[name].items() if k != "step_seconds")
            )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
