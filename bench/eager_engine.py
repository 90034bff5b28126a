"""What an eager engine (`actors.enforce_eager`, the default) saves: one rollout engine's start-up CPU and its
judgments/s with vLLM's logprob rank counter torch.compiled (vLLM's own behaviour) and run eagerly (ours:
the whole actor process forced eager), each arm in a fresh process, alternated, in one script.

    .venv/bin/python -m bench.eager_engine --data ../shared/data/scifact \
        --model models/SmolLM2-135M-Instruct [--prompts 32 --group-size 8 --max-tokens 4 --repeats 2]

Start-up: CPU seconds (this process and its children: inductor compiles in subprocesses) from before the
engine is made to the end of its first generate; compiled kernels are cached on disk (/tmp/torchinductor_*),
so the first compiled arm of a machine pays more than the later ones. Rate: the best of 3 timed rounds.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

from bench import data_model_parser
from bench.rollout import scifact_requests
from prorank.settings.config import ActorConfig, PromptConfig, SamplingConfig


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def arm(compiled: bool, model: str, data: str, prompts: int, group: int, max_tokens: int) -> dict:
    """One engine in this process: start-up CPU to the end of its first generate, then judgments/s."""
    import torch  # noqa: PLC0415 torch: heavy (~1.6 s), imported where tensors are used

    from prorank.actors.engine import RolloutEngine  # noqa: PLC0415 pulls vLLM, which importing this module does not

    reqs = scifact_requests(data, prompts)
    start = _cpu()
    engine = RolloutEngine(
        model, ActorConfig(max_model_len=1024), SamplingConfig(group_size=group, max_tokens=max_tokens), PromptConfig()
    )
    if compiled:
        torch.compiler.set_stance("default")  # undo the engine's force_eager: vLLM's own behaviour
    engine.generate(reqs[:2])
    start_cpu = _cpu() - start
    best = 0.0
    for _ in range(3):
        began = time.perf_counter()
        results = engine.generate(reqs)
        best = max(best, sum(len(r.completions) for r in results) / (time.perf_counter() - began))
    return {"start_cpu_s": start_cpu, "judgments_per_s": best}


def main() -> None:
    ap = data_model_parser(__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--arm", choices=["compiled", "eager"], help="internal: run one arm in this process, print its figures as JSON"
    )
    args = ap.parse_args()
    if args.arm:
        print(
            json.dumps(
                arm(args.arm == "compiled", args.model, args.data, args.prompts, args.group_size, args.max_tokens)
            )
        )
        return
    rows: dict[str, list[dict]] = {"compiled": [], "eager": []}
    for _ in range(args.repeats):
        for name in rows:
            argv = [sys.executable, "-m", "bench.eager_engine", *sys.argv[1:], "--arm", name]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            rows[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, rows[name][-1], flush=True)
    for key, best in (("start_cpu_s", min), ("judgments_per_s", max)):
        compiled, eager = (best(r[key] for r in rows[name]) for name in ("compiled", "eager"))
        print(f"{key}: compiled {compiled:.2f}, eager {eager:.2f}, eager/compiled {eager / compiled:.2f}x")


if __name__ == "__main__":
    main()
