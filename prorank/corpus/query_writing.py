"""Query synthesis's wire pieces and text rules: what an actor is asked (a document's prompt, built here in
the model's chat template) and answers (K sampled texts), and how an answer becomes a query.

The prompt is built by the driver, so an engine only samples (actors.engine.RolloutEngine.write_queries);
the answers are cleaned and judged well-formed here, before the corpus-level filters
(prorank/corpus/query_filters.py) run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from prorank.corpus.data import Document
from prorank.settings.synth_config import SynthesisConfig


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """Write `n` queries for one document: its prompt, tokenized, and the sampling."""

    request_id: str  # unique within a synthesis: the document id
    doc_id: str
    prompt_ids: list[int]
    n: int
    temperature: float
    top_p: float
    max_tokens: int


@dataclass(slots=True)
class WrittenQueries:
    """An actor's answer to a QueryRequest: the `n` sampled texts and why each ended."""

    request_id: str
    doc_id: str
    texts: list[str]
    finish_reasons: list[str | None] = field(default_factory=list)
    version: int = 0
    actor: str = ""
    seconds: float = 0.0  # wall time of the actor call this came from


class QueryPromptBuilder:
    """A document's query-writing prompt in the writer model's chat template, its text cut to
    `prompt.max_document_tokens` and to what `max_model_len` leaves after the answer's `max_tokens`."""

    def __init__(self, tokenizer, cfg: SynthesisConfig, max_model_len: int):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"the query writer's tokenizer ({tokenizer.name_or_path}) has no chat template")
        self.tokenizer, self.cfg = tokenizer, cfg
        overhead = len(self._ids(Document("", "", "")))
        self.doc_budget = min(cfg.prompt.max_document_tokens, max_model_len - cfg.max_tokens - overhead)
        if self.doc_budget < 16:
            raise ValueError(
                f"actors.max_model_len {max_model_len} leaves {self.doc_budget} document tokens after the "
                f"prompt ({overhead} tokens) and synthesis.max_tokens ({cfg.max_tokens})"
            )

    def _cut(self, text: str, budget: int) -> tuple[str, int]:
        """`text` cut to `budget` tokens, and its length in tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return (text, len(ids)) if len(ids) <= budget else (self.tokenizer.decode(ids[:budget]), budget)

    def _ids(self, doc: Document) -> list[int]:
        p = self.cfg.prompt
        messages = [{"role": "system", "content": p.system}] if p.system else []
        messages.append({"role": "user", "content": p.instruction.format(title=doc.title, text=doc.text)})
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in newer transformers

    def request(self, doc: Document) -> QueryRequest:
        title, title_tokens = self._cut(doc.title, self.doc_budget // 4)
        text, _ = self._cut(doc.text, self.doc_budget - title_tokens)
        c = self.cfg
        return QueryRequest(
            doc.doc_id,
            doc.doc_id,
            self._ids(Document(doc.doc_id, title, text)),
            c.queries_per_document,
            c.temperature,
            c.top_p,
            c.max_tokens,
        )


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: what the length, copy and duplicate rules count."""
    return [w.lower() for w in _WORD.findall(text)]


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"”']))\s+(?=[A-Z(\"“])")


def clean_query(text: str, strip_prefixes: Sequence[str], sentences: int = 1) -> str:
    """The first `sentences` sentences of an answer's first line, its stock prefixes and wrapping quotes
    removed, capitalised."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = line.strip(" \"'*`“”")
    for pattern in strip_prefixes:
        line = re.sub(pattern, "", line, count=1, flags=re.IGNORECASE).strip()
    line = " ".join(_SENTENCE_END.split(line)[:sentences]).strip(" \"'*`“”")
    return line[:1].upper() + line[1:]


def finished(raw: str, finish_reason: str | None) -> bool:
    """Whether the answer ended on its own, or at the length limit after a complete first sentence."""
    if finish_reason != "length":
        return True
    first = next((ln.strip() for ln in raw.strip().splitlines() if ln.strip()), "")
    return bool(_SENTENCE_END.search(first)) or len(raw.strip().splitlines()) > 1


def longest_copied_run(query_words: Sequence[str], doc_words: Sequence[str]) -> int:
    """The longest run of consecutive query words that appears, in order, in the document."""
    best = 0
    prev = [0] * (len(doc_words) + 1)
    for qw in query_words:
        cur = [0] * (len(doc_words) + 1)
        for j, dw in enumerate(doc_words, 1):
            if qw == dw:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def malformed(query: str, doc: Document, cfg: SynthesisConfig) -> str | None:
    """Why a cleaned query is not well-formed (the report's reason), or None."""
    f = cfg.filters
    ws = words(query)
    if not ws:
        return "empty"
    if len(ws) < f.min_words:
        return "too_short"
    if len(ws) > f.max_words:
        return "too_long"
    if 1 - len(set(ws)) / len(ws) > f.max_repeated_share:
        return "repeated_text"
    if f.max_copied_words and longest_copied_run(ws, words(f"{doc.title} {doc.text}")) > f.max_copied_words:
        return "copied_span"
    return None


def judge(raw: str, finish_reason: str | None, doc: Document, cfg: SynthesisConfig) -> tuple[str, str | None]:
    """An answer as a query, and why it is not well-formed (the report's reason) or None: the first filter,
    and the progress bar's share."""
    text = clean_query(raw, cfg.prompt.strip_prefixes, cfg.prompt.sentences)
    return text, malformed(text, doc, cfg) if finished(raw, finish_reason) else "unfinished"


def fold(query: str) -> str:
    """A query's duplicate key: its words, lower-cased, punctuation dropped."""
    return " ".join(words(query))
