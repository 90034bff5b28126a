"""Where one score step's time goes in the real learner: a DeepSpeed rank (learner/rank.py) built in this
process with the recipe's learner settings, one SciFact query (positive + BM25 hard negatives) a step,
profiled with torch.profiler after warm-up steps. Prints the phases (forward of the frozen bottom and of
the trained top, loss, backward, optimizer step with DeepSpeed's bookkeeping) and the operators by self
time, grouped into kinds (matrix products, attention, copies and casts, elementwise, ...).

    .venv/bin/python -m bench.score_profile --data ../shared/data/scifact --model models/SmolLM2-135M-Instruct

Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench import load_recipe, recipe_parser
from bench.score_step import cpu_kind, job_batches
from prorank.learner.objectives import RankingObjective

# Operator name -> kind, first match wins (names as torch.profiler reports them).
KINDS = (
    # Attention first: with the eager kernel its products are batched (bmm) around a softmax.
    ("attention", ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::_softmax", "softmax_backward")),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "mkldnn")),
    ("copies and casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::cat", "aten::clone", "contiguous")),
    ("optimizer", ("Optimizer.", "_foreach", "_fused_adam", "aten::lerp", "aten::addcdiv", "aten::sqrt")),
    ("reductions and norms", ("aten::mean", "aten::sum", "aten::rsqrt", "aten::pow", "aten::norm", "linalg")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::neg", "aten::div", "aten::sub", "aten::exp")),
)


PHASES = ("step", "forward and loss", "forward: frozen bottom", "backward", "optimizer step (DeepSpeed)")


def kind_of(name: str) -> str:
    for kind, prefixes in KINDS:
        if any(name.startswith(p) or p in name for p in prefixes):
            return kind
    return "other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_hooks(model, trainable: int):
    """Forward hooks that mark where the frozen bottom ends: record_function ranges around each part."""
    layers = model.get_decoder().layers
    first_top = layers[len(layers) - trainable]
    ranges: dict[str, record_function] = {}

    def start_bottom(module, args, kwargs):
        if "forward: frozen bottom" not in ranges:
            ranges["forward: frozen bottom"] = record_function("forward: frozen bottom").__enter__()

    def start_top(module, args, kwargs):
        bottom = ranges.pop("forward: frozen bottom", None)
        if bottom is not None:
            bottom.__exit__(None, None, None)

    handles = [
        layers[0].register_forward_pre_hook(start_bottom, with_kwargs=True),
        first_top.register_forward_pre_hook(start_top, with_kwargs=True),
    ]
    return handles


def main(argv: list[str] | None = None) -> dict:
    ap = recipe_parser(__doc__)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=25, help="operators listed")
    ap.add_argument("--time-only", action="store_true", help="time the steps without the profiler")
    ap.add_argument("--trace", default=None, help="also write a Chrome trace here")
    ap.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    cfg = load_recipe(args)
    sc, lc = cfg.score, cfg.score_learner()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    groups, _ = job_batches(cfg, args.steps + 2)

    from prorank.learner.rank import LearnerRank  # noqa: PLC0415 pulls DeepSpeed

    rank = LearnerRank(0, 1, args.model, lc.model_copy(update={"num_ranks": 1}), RankingObjective.of(sc))
    rank.setup("127.0.0.1", free_port())
    for g in groups[:2]:
        rank.train_step([g], 1.0)
    trainable = lc.trainable_layers or len(rank.engine.module.get_decoder().layers)
    engine = rank.engine
    original_step, original_backward = engine.step, engine.backward

    def timed_backward(loss, **kw):
        with record_function("backward"):
            return original_backward(loss, **kw)

    def timed_step(**kw):
        with record_function("optimizer step (DeepSpeed)"):
            return original_step(**kw)

    engine.backward, engine.step = timed_backward, timed_step
    objective, original_loss = rank.objective, rank.objective.loss

    def timed_loss(*a, **kw):
        with record_function("forward and loss"):
            return original_loss(*a, **kw)

    objective.loss = timed_loss  # type: ignore[method-assign]
    handles = phase_hooks(engine.module, trainable)
    seconds = []
    if args.time_only:
        for g in groups[2:]:
            start = time.perf_counter()
            rank.train_step([g], 1.0)
            seconds.append(time.perf_counter() - start)
        print(f"{sorted(seconds)[len(seconds) // 2]:.3f} s a step (median of {len(seconds)}): {seconds}")
        return {"seconds": seconds}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for g in groups[2:]:
            start = time.perf_counter()
            with record_function("step"):
                rank.train_step([g], 1.0)
            seconds.append(time.perf_counter() - start)
    for h in handles:
        h.remove()
    if args.trace:
        prof.export_chrome_trace(args.trace)

    steps = len(seconds)
    total = sum(seconds) / steps
    phases: dict[str, float] = defaultdict(float)  # seconds a step in each marked range
    per_phase: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # phase -> op -> self s
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name in PHASES:
            phases[e.name] += e.cpu_time_total / 1e6 / steps
            continue
        phase, parent = "(outside the marked phases)", e.cpu_parent
        while parent is not None:
            if parent.name in PHASES and parent.name != "step":
                phase = parent.name
                if phase != "forward and loss":
                    break
            parent = parent.cpu_parent
        own = e.self_cpu_time_total / 1e6 / steps
        per_phase[phase][e.name] += own
        by_kind[kind_of(e.name)] += own
        by_op[e.name] += own
    phases["forward: trained top and loss"] = phases["forward and loss"] - phases["forward: frozen bottom"]
    print(f"{cpu_kind()}; {torch.get_num_threads()} threads; {steps} profiled steps, {total:.2f} s a step")
    candidates = groups[0].prompt_ids
    print(f"{len(candidates)} candidates, {sum(len(p) for p in candidates) / len(candidates):.0f} tokens a prompt")
    print("phases (s a step):")
    for name, value in phases.items():
        print(f"  {name:40s} {value:6.3f}  {value / total:6.1%}")
    print("operator kinds by self time (s a step):")
    for name, value in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {value:6.3f}  {value / total:6.1%}")
    for phase, ops in sorted(per_phase.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"{phase}: top operators by self time")
        for name, value in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {name[:60]:60s} {value:6.3f}  {value / total:6.1%}")
    report = {
        "cpu": cpu_kind(),
        "seconds_per_step": total,
        "phases": phases,
        "kinds": dict(by_kind),
        "operators": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]),
        "per_phase": {
            phase: dict(sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]) for phase, ops in per_phase.items()
        },
    }
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
