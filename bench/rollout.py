"""Judgments/s: one vLLM rollout actor vs transformers `generate(num_return_sequences=G)`, then 1 vs 2
actors, on the same SciFact prompts and model, each timed after a warm-up, in one script.

    .venv/bin/python -m bench.rollout --data ../shared/data/scifact \
        --model models/SmolLM2-135M-Instruct --prompts 32 --group-size 8 --max-tokens 4 [--seed-ab]
"""

from __future__ import annotations

import os
import time

from bench import data_model_parser
from prorank.corpus.data import load_dataset
from prorank.model.models import load_causal_lm
from prorank.model.prompt import PromptBuilder
from prorank.run.rollout import RolloutRequest
from prorank.settings.config import ActorConfig, DataConfig, ModelConfig, PromptConfig, SamplingConfig

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def scifact_requests(data: str, n: int):

    ds = load_dataset(DataConfig(path=data, split="test"))
    reqs: list = []
    for qid in ds.query_ids:
        for did in ds.qrels[qid]:
            doc = ds.corpus[did]
            reqs.append(RolloutRequest(f"r{len(reqs)}", qid, did, ds.queries[qid], f"{doc.title} {doc.text}"))
    return reqs[:n]


def transformers_rate(model_dir: str, reqs, prompt_cfg, group: int, max_tokens: int) -> float:
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used so the CLI and core stay light

    model, tok = load_causal_lm(ModelConfig(path=model_dir))
    builder = PromptBuilder.from_config(tok, prompt_cfg)
    prompts = builder.encode_batch([(r.query, r.document) for r in reqs])

    def run(batch):
        with torch.inference_mode():
            for ids in batch:
                model.generate(
                    torch.tensor([ids]),
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=0,
                    num_return_sequences=group,
                    max_new_tokens=max_tokens,
                    pad_token_id=tok.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                )

    run(prompts[:2])  # warm-up
    start = time.perf_counter()
    run(prompts)
    return len(prompts) * group / (time.perf_counter() - start)


def pool_rate(model_dir: str, reqs, prompt_cfg, group: int, max_tokens: int, actors: int, cpus: float) -> float:
    from prorank.actors.pool import ActorPool  # noqa: PLC0415 pulls ray, torch, which importing this module does not

    pool = ActorPool(
        model_dir,
        ActorConfig(num_actors=actors, num_cpus=cpus, max_model_len=1024, chunk_size=4),
        SamplingConfig(group_size=group, max_tokens=max_tokens),
        prompt_cfg,
    ).start()
    try:
        warm = [
            r.__class__(f"w{i}", r.query_id, r.doc_id, r.query, r.document + " warm-up")
            for i, r in enumerate(reqs[: 2 * actors])
        ]
        pool.generate(warm)  # the first requests of each engine (prefix cache, allocations) are not timed
        start = time.perf_counter()
        results = pool.generate(reqs)
        seconds = time.perf_counter() - start
    finally:
        pool.shutdown()
    return sum(len(r.completions) for r in results) / seconds


def seed_ab(model_dir: str, reqs, prompt_cfg, group: int, max_tokens: int, rounds: int = 3) -> tuple[float, float]:
    """Judgments/s of one engine with per-request seeds and with one stream per engine, alternated
    `rounds` times on the same prompts (best of each): what `sampling.per_request_seed` costs."""
    from prorank.actors.engine import RolloutEngine  # noqa: PLC0415 pulls torch, which importing this module does not

    engine = RolloutEngine(
        model_dir, ActorConfig(max_model_len=1024), SamplingConfig(group_size=group, max_tokens=max_tokens), prompt_cfg
    )
    engine.generate(reqs[:2])  # warm-up
    best = {True: 0.0, False: 0.0}
    for _ in range(rounds):
        for seeded in (True, False):
            engine.per_request_seed = seeded
            start = time.perf_counter()
            results = engine.generate(reqs)
            rate = sum(len(r.completions) for r in results) / (time.perf_counter() - start)
            best[seeded] = max(best[seeded], rate)
    return best[True], best[False]


def main() -> None:
    ap = data_model_parser(__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed-ab", action="store_true", help="only: per-request seeds vs one stream per engine")
    args = ap.parse_args()
    if args.seed_ab:
        seeded, plain = seed_ab(
            args.model,
            scifact_requests(args.data, args.prompts),
            PromptConfig(max_length=args.max_length),
            args.group_size,
            args.max_tokens,
        )
        print(
            f"one engine, per-request seeds: {seeded:8.2f} judgments/s; one stream per engine: {plain:8.2f}; "
            f"ratio {seeded / plain:.2f}x"
        )
        return

    import ray  # noqa: PLC0415 Ray: heavy, needed only by the job and its actors

    prompt_cfg = PromptConfig(max_length=args.max_length)
    reqs = scifact_requests(args.data, args.prompts)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    g, t = args.group_size, args.max_tokens
    one = pool_rate(args.model, reqs, prompt_cfg, g, t, actors=1, cpus=args.cpus)
    print(f"vLLM, 1 actor ({args.cpus} CPUs):  {one:8.2f} judgments/s", flush=True)
    two = pool_rate(args.model, reqs, prompt_cfg, g, t, actors=2, cpus=args.cpus / 2)
    print(f"vLLM, 2 actors ({args.cpus / 2:g} CPUs each): {two:8.2f} judgments/s", flush=True)
    ray.shutdown()
    hf = transformers_rate(args.model, reqs, prompt_cfg, g, t)
    print(f"transformers generate:         {hf:8.2f} judgments/s")
    print(f"ratio vLLM 1 actor / transformers: {one / hf:.2f}x")
    print(f"ratio 2 actors / 1 actor:          {two / one:.2f}x")


if __name__ == "__main__":
    main()
