"""`prorank export`: a checkpoint -> a Hugging Face model folder our users ship.

The folder holds the model (safetensors), its tokenizer with the chat template, a model card (README.md)
with the prompt layout, how to score with plain transformers, and the evaluation table, and
`prorank.json`, the prompt settings the scores were computed with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prorank.models import ModelError, checkpoint_model_dir
from prorank.prompt import ANSWERS, SYSTEM_PROMPT, USER_TEMPLATE

MEASURES = ("nDCG@10", "RR@10", "R@100")

_USAGE = '''```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}").eval()
SYSTEM = {system!r}

def score(query: str, document: str) -> float:
    messages = [{{"role": "system", "content": SYSTEM}},
                {{"role": "user", "content": f"query: {{query}}\\ndocument: {{document}}\\nRelevance:"}}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    return (logits[one] - logits[zero]).item()  # higher: more relevant
```'''


def evaluation_rows(reports: list[dict]) -> list[tuple[str, dict]]:
    """(system, metrics) rows from `prorank eval` JSON reports: BM25 once, then each model."""
    rows, seen_bm25 = [], False
    for report in reports:
        settings = report.get("settings", {})
        if "bm25" in report and not seen_bm25:
            rows.append(("BM25", report["bm25"]))
            seen_bm25 = True
        if "model" in report:
            label = report.get("label") or settings.get("model", "model")
            rows.append((str(label), report["model"]))
    return rows


def model_card(name: str, reports: list[dict], summary: dict | None, prompt: dict) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-ranking", "tags: [reranker, prorank]",
             "---", "", f"# {name}", "",
             "A reranker trained with ProRank RL: GRPO prompt warmup, then fine-grained score learning. "
             "No layer was added: the relevance score is logit(\"1\") - logit(\"0\") at the assistant's "
             "first token.", "", "## Prompt layout", "",
             "The tokenizer's chat template, with the generation prompt of the assistant:", "",
             f"- system: `{SYSTEM_PROMPT}`", f"- user: `{USER_TEMPLATE!r}`",
             f"- answers: `{ANSWERS[0]}` (not relevant), `{ANSWERS[1]}` (relevant)",
             f"- truncation: query at most {prompt['max_query_tokens']} tokens, whole prompt at most "
             f"{prompt['max_length']} tokens (the document is cut)", "", "## Scoring with transformers", "",
             _USAGE.format(name=name, system=SYSTEM_PROMPT), "",
             "Or: `from prorank import Reranker; Reranker(path).rank(query, documents, top_k=10)`.", ""]
    rows = evaluation_rows(reports)
    if rows:
        settings = reports[0].get("settings", {})
        lines += ["## Evaluation", "",
                  f"{settings.get('dataset', '?')} {settings.get('split', '?')}, {settings.get('queries', '?')} "
                  f"queries, BM25 top {settings.get('bm25_top_k', '?')} with the top "
                  f"{settings.get('rerank_depth', '?')} reranked.", "",
                  "| system | " + " | ".join(MEASURES) + " |", "|---" * (len(MEASURES) + 1) + "|"]
        lines += [f"| {system} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in MEASURES) + " |"
                  for system, m in rows]
        lines.append("")
    if summary:
        lines += ["## Training", "", f"Stages {', '.join(summary.get('stages', ['warmup']))}, "
                  f"{summary.get('steps')} learner steps in all; dev nDCG@10 at the end "
                  f"{summary.get('final', {}).get('dev/ndcg@10', float('nan')):.4f} "
                  f"(BM25 {summary.get('dev_bm25') or float('nan'):.4f}).", ""]
    return "\n".join(lines)


def export_model(checkpoint: str | Path, output: str | Path, reports: list[dict] | None = None,
                 prompt: dict | None = None, name: str | None = None) -> Path:
    """Copy the model behind `checkpoint` (a checkpoint step, checkpoints root or model folder) to
    `output`, with a model card and prompt settings. The training summary is found beside the checkpoints."""
    source = Path(checkpoint_model_dir(str(checkpoint)))
    if not source.is_dir():
        raise ModelError(f"{checkpoint} is not a local checkpoint or model folder")
    out = Path(output)
    if out.resolve() == source.resolve():
        raise ModelError(f"--output {out} is the checkpoint's own model folder")
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    summary = _find_summary(source)
    prompt = prompt or (summary or {}).get("prompt") or {"max_length": 512, "max_query_tokens": 64}
    (out / "prorank.json").write_text(json.dumps(
        {"system_prompt": SYSTEM_PROMPT, "user_template": USER_TEMPLATE, "answers": list(ANSWERS),
         "score": 'logit("1") - logit("0") at the last prompt position', **prompt}, indent=2) + "\n")
    (out / "README.md").write_text(model_card(name or out.name, reports or [], summary, prompt))
    return out


def _find_summary(model_dir: Path) -> dict | None:
    """summary.json of the run the model came from: model/ -> step-N/ -> checkpoints/ -> run dir."""
    for parent in list(model_dir.parents)[:3]:
        if (parent / "summary.json").is_file():
            return json.loads((parent / "summary.json").read_text())
    return None
