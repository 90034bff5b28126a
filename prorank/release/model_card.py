"""The model card (README.md) `prorank export` writes: the prompt layout, the training length, how each
client our users serve rerankers with scores the model, and the evaluation table."""

from __future__ import annotations

import json

from prorank.model.prompt import ANSWERS, LAYOUT, TASK_PROMPT
from prorank.release.fusion import FusionSettings

MEASURES = ("nDCG@10", "RR@10", "R@100")

_CLIENTS = """## Scoring it

Every client below gives the same score for a (query, document) pair when the prompt fits in the length
it is given (float32; the project's tests check each on SciFact pairs against `prorank eval`).

**mxbai-rerank** (the method authors' package; it runs under transformers 4.x):

```python
from mxbai_rerank import MxbaiRerankV2

model = MxbaiRerankV2("{name}", max_length={max_length}, torch_dtype="float32")
model.rank(query, documents, top_k=10{instruction_kwarg})  # each hit's .score: logit("1") - logit("0")
```

**sentence-transformers** (`CrossEncoder`; this folder carries its modules: the causal LM, then
logit("1") - logit("0") at the last token, no activation):

```python
from sentence_transformers import CrossEncoder

model = CrossEncoder("{name}")
scores = model.predict([(query, document) for document in documents])  # the same scores
```

**vLLM** (score API: served as a one-label classifier whose output is sigmoid(logit("1") - logit("0")),
the same order; the pair template is this folder's `chat_template.jinja`):

```python
from vllm import LLM

llm = LLM(model="{name}", runner="pooling", dtype="float32", hf_overrides={overrides})
template = open("{name}/chat_template.jinja").read()
outputs = llm.score(query, documents, chat_template=template)  # outputs[i].outputs.score
```

or `vllm serve {name} --runner pooling --hf-overrides '{overrides_json}' --chat-template {name}/chat_template.jinja`.

**ProRank RL**: `from prorank import Reranker; Reranker("{name}").rank(query, documents, top_k=10)`.

**Plain transformers**: build the token ids as `mxbai-rerank` does (pieces tokenized separately, below),
run the model and take logit("1") - logit("0") at the last position.
"""


def evaluation_rows(reports: list[dict]) -> list[tuple[str, dict]]:
    """(system, metrics) rows from `prorank eval` JSON reports: the first stage once, then each model
    (and its fusion with the first stage, when the report has one)."""
    rows, seen_first = [], False
    for report in reports:
        settings = report.get("settings", {})
        first = "bm25" if "bm25" in report else "first_stage" if "first_stage" in report else None
        if first and not seen_first:
            rows.append(("BM25" if first == "bm25" else str(settings.get("first_stage", "first stage")), report[first]))
            seen_first = True
        label = str(report.get("label") or settings.get("model", "model"))
        if "model" in report:
            rows.append((label, report["model"]))
        if "fused" in report:
            rows.append((f"{label}, fused with the first stage", report["fused"]))
    return rows


def benchmark_section(report: dict) -> list[str]:
    """A multi-dataset report's table, as `prorank eval` wrote it, with what was evaluated."""
    settings = report.get("settings", {})
    models = ", ".join(f"{name} ({about.get('source')})" for name, about in settings.get("models", {}).items())
    return [
        "## Evaluation on several datasets",
        "",
        f"{len(report['datasets'])} datasets, a sample of at most {settings.get('max_queries') or 'all'} queries "
        f"each (seed {settings.get('seed')}), BM25 top {settings.get('bm25_top_k')} with the top "
        f"{settings.get('rerank_depth')} reranked, query + document cut to {settings.get('max_length')} tokens; "
        f"models: {models or 'none'}. p: {settings.get('test', 'paired t-test')} against the first stage.",
        "",
        report["table"],
    ]


def fusion_section(fusion: FusionSettings) -> list[str]:
    """How to fuse the model's score with the first stage's, as chosen on held-out training queries."""
    tuned = fusion.tuned_on
    figures = tuned.get("ndcg@10", {})
    lines = [
        "## Fusion with the first stage",
        "",
        f"The model's score fused with the first stage's ({tuned.get('first_stage', 'first stage')}): "
        f"the fusion chosen by ranx's grid search for nDCG@10 on "
        f"{tuned.get('queries', '?')} {tuned.get('dataset', '')} `{tuned.get('split', '?')}` queries that "
        f"training held out (never test queries), over each query's top {tuned.get('rerank_depth', '?')}: "
        f"**{fusion.describe()}**.",
    ]
    if figures:
        lines += ["", "| on the held-out queries | nDCG@10 |", "|---|---|"]
        lines += [f"| {name.replace('_', ' ')} | {value:.4f} |" for name, value in figures.items()]
    lines += [
        "",
        "It is stored in `prorank.json` (`fusion`). **ProRank RL** applies it: "
        '`Reranker("{name}").rank(query, documents, first_stage_scores=bm25_scores)`. With any other '
        "client, score the candidates, then fuse over one query's candidates:",
        "",
        "```python",
    ]
    if fusion.method == "wsum":
        first, model = fusion.params["weights"]
        lines += [
            "def min_max(xs):",
            "    lo, hi = min(xs), max(xs)",
            "    return [(x - lo) / max(hi - lo, 1e-9) for x in xs]",
            "",
            f"fused = [{first!r} * f + {model!r} * m for f, m in zip(min_max(first_stage_scores), "
            "min_max(model_scores))]",
        ]
    else:
        k = fusion.params["k"]
        lines += [
            "def ranks(xs):",
            "    order = sorted(range(len(xs)), key=lambda i: -xs[i])",
            "    return {i: r for r, i in enumerate(order, 1)}",
            "",
            "rf, rm = ranks(first_stage_scores), ranks(model_scores)",
            f"fused = [1 / ({k} + rf[i]) + 1 / ({k} + rm[i]) for i in range(len(model_scores))]",
        ]
    return lines + ["```", ""]


def model_card(
    name: str,
    reports: list[dict],
    summary: dict | None,
    prompt: dict,
    overrides: dict,
    fusion: FusionSettings | None = None,
) -> str:
    instruction = prompt.get("instruction")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-ranking",
        "tags: [reranker, prorank, sentence-transformers]",
        "---",
        "",
        f"# {name}",
        "",
        "A reranker trained with ProRank RL: GRPO prompt warmup, then fine-grained score learning. "
        'No layer was added: the relevance score is logit("1") - logit("0") at the assistant\'s '
        "first token (higher: more relevant).",
        "",
        "## Prompt layout",
        "",
        f"`{LAYOUT}`: the layout of the released ProRank models (mxbai-rerank-v2), built from pieces "
        "tokenized separately and joined as token ids:",
        "",
        "1. `<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\\n<|im_start|>user\\n`",
        "2. "
        + (f"`instruction: {instruction}\\nquery: {{query}}`" if instruction else "`query: {query}`")
        + ", cut to 3/4 of the length budget",
        "3. `\\n` and `document: {document}`, cut at its end so that 2 and 3 fit the budget",
        "4. `\\n` and the task text `" + TASK_PROMPT.replace("\n", "\\n") + "`",
        "5. `<|im_end|>\\n<|im_start|>assistant\\n`",
        "",
        f"Answers: `{ANSWERS[0]}` (not relevant), `{ANSWERS[1]}` (relevant). **Trained at a length budget of "
        f"{prompt['max_length']} tokens** of query and document (the fixed pieces come on top); longer "
        "documents were cut there in training. Clients may score whole documents; pass "
        f"`max_length={prompt['max_length']}` to mxbai-rerank to score exactly as in training.",
        "",
    ]
    lines += [
        _CLIENTS.format(
            name=name,
            max_length=prompt["max_length"],
            overrides=overrides,
            overrides_json=json.dumps(overrides),
            instruction_kwarg=f", instruction={instruction!r}" if instruction else "",
        )
    ]
    if fusion is not None:
        lines += [line.replace("{name}", name) for line in fusion_section(fusion)]
    for report in reports:  # multi-dataset reports (`prorank eval` of several datasets): their table
        if "datasets" in report:
            lines += benchmark_section(report)
    rows = evaluation_rows([r for r in reports if "datasets" not in r])
    if rows:
        settings = reports[0].get("settings", {})
        lines += [
            "## Evaluation",
            "",
            f"{settings.get('dataset', '?')} {settings.get('split', '?')}, {settings.get('queries', '?')} "
            f"queries, BM25 top {settings.get('bm25_top_k', '?')} with the top "
            f"{settings.get('rerank_depth', '?')} reranked, query + document cut to "
            f"{settings.get('max_length', '?')} tokens.",
            "",
            "| system | " + " | ".join(MEASURES) + " |",
            "|---" * (len(MEASURES) + 1) + "|",
        ]
        lines += [
            f"| {system} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in MEASURES) + " |"
            for system, m in rows
        ]
        lines.append("")
    if summary:
        lines += [
            "## Training",
            "",
            f"Stages {', '.join(summary.get('stages', ['warmup']))}, "
            f"{summary.get('steps')} learner steps in all, prompts at a length budget of "
            f"{prompt['max_length']} tokens; dev nDCG@10 at the end "
            f"{summary.get('final', {}).get('dev/ndcg@10', float('nan')):.4f} "
            f"(BM25 {summary.get('dev_bm25') or float('nan'):.4f}).",
            "",
        ]
    return "\n".join(lines)
