"""An exported model in the clients our users serve rerankers with, against `prorank eval`'s own scores.

Exports a model (by default SmolLM2-135M-Instruct) with `prorank export`, takes the BM25 top candidates of
the first SciFact test queries (whole documents), scores them with `prorank eval`'s scorer (float32) and
with each real client: `mxbai-rerank`'s `MxbaiRerankV2` (in .venv-clients, transformers 4), sentence-
transformers' `CrossEncoder` and vLLM's score API (each in its own process), then prints and writes the
largest score difference, the Spearman correlation and how many queries keep the same order.

    .venv/bin/python -m bench.clients --output docs/results/clients.json

The runners below are also what tests/integration/test_clients.py calls.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import load_local
from prorank.model.models import load_causal_lm, model_context
from prorank.model.prompt import PromptBuilder
from prorank.release.export import export_model
from prorank.settings.config import BM25Config, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ROOT / "scripts" / "clients"
CLIENTS_PYTHON = Path(os.environ.get("PRORANK_CLIENTS_PYTHON", ROOT / ".venv-clients" / "bin" / "python"))
FULL = 100_000  # above any context: the budget shrinks to the model's, as mxbai-rerank's default does


class ClientError(RuntimeError):
    """A client runner that could not run or failed."""


def run_client(python: Path, runner: str, payload: dict, *args: str) -> str:
    """stdout of scripts/clients/<runner> run by `python` with `payload` as JSON on stdin."""
    if not python.is_file():
        raise ClientError(f"{python} is missing: run `bash scripts/install-clients.sh` (scripts/test.sh does)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(python), str(RUNNERS / runner), *args],
        input=json.dumps(payload),
        text=True,
        capture_output=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise ClientError(f"{runner} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def mxbai(folder: Path, pairs: list[tuple[str, str]], runs: list[dict]) -> dict:
    """`MxbaiRerankV2` on `pairs`, once per run ({"max_length", "instruction", "scores"}): ids and scores."""
    return json.loads(
        run_client(CLIENTS_PYTHON, "mxbai_scores.py", {"model": str(folder), "pairs": pairs, "runs": runs})
    )


def vllm(folder: Path, candidates: dict[str, list[tuple[str, str]]]) -> dict:
    """vLLM's score API per query: {"scores": sigmoid outputs, "logits": without the activation}."""
    payload = {
        "model": str(folder),
        "queries": [{"query": pairs[0][0], "documents": [d for _, d in pairs]} for pairs in candidates.values()],
    }
    out = run_client(Path(sys.executable), "vllm_scores.py", payload)
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


def cross_encoder(folder: Path, pairs: list[tuple[str, str]]) -> list[float]:
    from sentence_transformers import CrossEncoder  # noqa: PLC0415 sentence-transformers: heavy, a client under test only

    return CrossEncoder(str(folder), device="cpu").predict(pairs, batch_size=8).tolist()


def our_scores(folder: Path, candidates: dict[str, list[tuple[str, str]]], max_length: int) -> dict[str, list[float]]:
    """What `prorank eval` ranks by: its scorer on each query's candidates, float32."""
    from prorank.model.scoring import score_query  # noqa: PLC0415 pulls torch, which importing this module does not

    model, tok = load_causal_lm(ModelConfig(path=str(folder)))
    builder = PromptBuilder(tok, max_length, limit=model_context(model))
    return {qid: score_query(model, builder, pairs[0][0], [d for _, d in pairs]) for qid, pairs in candidates.items()}


def scifact_candidates(data_dir: Path, queries: int, depth: int) -> dict[str, list[tuple[str, str]]]:
    from prorank.eval.rerank import candidate_pairs  # noqa: PLC0415 pulls torch, which importing this module does not

    data = load_local(data_dir, "test")
    qids = data.query_ids[:queries]
    return candidate_pairs(data, bm25_search(data, qids, BM25Config(top_k=depth)), depth)


def flat(candidates: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    return [pair for pairs in candidates.values() for pair in pairs]


def per_query(candidates: dict[str, list], values: list[float]) -> dict[str, list[float]]:
    out, at = {}, 0
    for qid, pairs in candidates.items():
        out[qid], at = values[at : at + len(pairs)], at + len(pairs)
    return out


def order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def agreement(got: dict[str, list[float]], ours: dict[str, list[float]]) -> dict[str, float]:
    from scipy.stats import spearmanr  # noqa: PLC0415 scipy: heavy

    a = [s for q in ours for s in got[q]]
    b = [s for q in ours for s in ours[q]]
    return {
        "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
        "spearman": float(spearmanr(a, b).statistic),
        "queries_same_order": sum(order(got[q]) == order(ours[q]) for q in ours),
        "queries": len(ours),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--trained-length", type=int, default=192)
    parser.add_argument("--output")
    args = parser.parse_args()

    candidates = scifact_candidates(Path(args.data), args.queries, args.depth)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_model(
            args.model, Path(tmp) / "exported", prompt={"layout": "mxbai-v2", "max_length": args.trained_length}
        )
        ours = our_scores(folder, candidates, FULL)
        ours_trained = our_scores(folder, candidates, args.trained_length)
        answer = mxbai(
            folder,
            flat(candidates),
            [
                {"max_length": 8192, "instruction": None, "scores": True},
                {"max_length": args.trained_length, "instruction": None, "scores": True},
            ],
        )
        served = vllm(folder, candidates)
        results = {
            "mxbai-rerank, full length": agreement(per_query(candidates, answer["runs"][0]["scores"]), ours),
            f"mxbai-rerank, max_length {args.trained_length}": agreement(
                per_query(candidates, answer["runs"][1]["scores"]), ours_trained
            ),
            "sentence-transformers CrossEncoder": agreement(
                per_query(candidates, cross_encoder(folder, flat(candidates))), ours
            ),
            "vLLM score API, use_activation=False": agreement(dict(zip(candidates, served["logits"])), ours),
            "vLLM score API, logit of its sigmoid": agreement(
                {q: [math.log(p / (1 - p)) for p in ps] for q, ps in zip(candidates, served["scores"])}, ours
            ),
        }
    report = {
        "model": args.model,
        "pairs": len(flat(candidates)),
        "queries": len(candidates),
        "dtype": "float32",
        "transformers_in_mxbai_venv": answer["transformers"],
        "clients": results,
    }
    for name, r in results.items():
        print(
            f"{name:45s} max |diff| {r['max_abs_diff']:.2e}  Spearman {r['spearman']:.6f}  "
            f"same order {r['queries_same_order']}/{r['queries']}"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
