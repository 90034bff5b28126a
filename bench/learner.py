"""GRPO learner throughput, in one script on the same batch of real SciFact prompts:
(1) completions/s of one step: DeepSpeed ZeRO-2 and ZeRO-3 (2 ranks each) vs a plain single-process
    torch loop; (2) the shared-prefix forward+backward vs the naive one (G full passes), for one group.

    .venv/bin/python -m bench.learner --data ../shared/data/scifact --model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import os
import time

import torch

from bench import data_model_parser
from prorank.corpus.data import load_dataset
from prorank.learner.forward import naive_group_logprobs, shared_prefix_group_logprobs
from prorank.learner.objectives import GrpoObjective
from prorank.learner.torch_loop import TorchLearner
from prorank.model.models import load_tokenizer
from prorank.model.prompt import PromptBuilder
from prorank.run.rollout import ScoredGroup
from prorank.settings.config import DataConfig, StageLearnerConfig


def make_groups(data: str, model_dir: str, n: int, g: int, prompt_len: int):

    ds = load_dataset(DataConfig(path=data, split="test"))
    tok = load_tokenizer(model_dir)
    builder = PromptBuilder(tok, max_length=prompt_len)
    zero, one = builder.answer_ids
    groups = []
    for i, qid in enumerate(ds.query_ids[:n]):
        doc = ds.corpus[next(iter(ds.qrels[qid]))]
        prompt = builder.encode(ds.queries[qid] + " detail" * 40, f"{doc.title} {doc.text}" * 3)
        completions = [[one if j % 2 else zero, tok.eos_token_id] for j in range(g)]
        groups.append(ScoredGroup(prompt, completions, [[-0.7, -0.1]] * g, [float(j % 2) + 1 for j in range(g)]))
    return groups, tok.pad_token_id


def time_forward(model, group, pad_id, shared: bool, repeats: int) -> float:

    fn = shared_prefix_group_logprobs if shared else naive_group_logprobs
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        fn(model, group.prompt_ids, group.completions, pad_id).logprobs.sum().backward()
        best = min(best, time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return best


def main() -> None:
    ap = data_model_parser(__doc__)
    ap.add_argument("--groups", type=int, default=4, help="groups per learner step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 transformers: heavy, loaded only where a model or tokenizer is

    from prorank.learner.group import LearnerGroup  # noqa: PLC0415 pulls ray, which importing this module does not

    groups, pad_id = make_groups(args.data, args.model, args.groups, args.group_size, args.prompt_len)
    print(
        f"{len(groups)} groups of G={args.group_size}, prompts of {len(groups[0].prompt_ids)} tokens, "
        f"{os.cpu_count()} cores",
        flush=True,
    )

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    naive = time_forward(model, groups[0], pad_id, shared=False, repeats=1)
    shared = time_forward(model, groups[0], pad_id, shared=True, repeats=1)
    p, g = len(groups[0].prompt_ids), args.group_size
    print(
        f"one group, forward+backward: naive {naive:.2f}s, shared prefix {shared:.2f}s: {naive / shared:.2f}x faster; "
        f"prompt tokens {g * p} vs {p} ({g}x fewer)",
        flush=True,
    )

    def rate(step) -> float:
        step(groups)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step(groups)
        return args.steps * len(groups) * args.group_size / (time.perf_counter() - start)

    cfg = StageLearnerConfig(num_ranks=1, groups_per_step=args.groups, micro_batch_groups=1, lr=1e-6, beta=0.04)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    rates = {"torch loop, 1 process": rate(TorchLearner(model, ref, cfg, pad_id).step)}
    del model, ref
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    for stage in (2, 3):
        ds_cfg = cfg.model_copy(
            update={"num_ranks": 2, "zero_stage": stage, "num_cpus": max(1, (os.cpu_count() or 2) // 2)}
        )
        learner = LearnerGroup(args.model, ds_cfg, GrpoObjective(ds_cfg))
        rates[f"DeepSpeed ZeRO-{stage}, 2 ranks"] = rate(learner.step)
        learner.shutdown()
    ray.shutdown()
    base = rates["torch loop, 1 process"]
    for name, value in rates.items():
        print(f"{name:28s} {value:7.2f} completions/s   ratio vs torch loop {value / base:.2f}x")


if __name__ == "__main__":
    main()
