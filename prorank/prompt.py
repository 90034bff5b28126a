"""The one definition of the ProRank prompt, its answer tokens, the relevance score and the judgment parser.

The layout is the one released with the method (mxbai-rerank-v2): the tokenizer's chat template, a
system message asking for a binary judgment, the user turn `query: ...\\ndocument: ...\\nRelevance:`
and the generation prompt of the assistant. The score is logit("1") - logit("0") at the position that
predicts the assistant's first token.

Truncation is by tokens: the query is capped, the document fills the rest. The truncated texts are
decoded back and the whole prompt is rendered through the chat template, so the token ids equal what
`tokenizer.apply_chat_template(messages(...), add_generation_prompt=True)` gives a plain transformers
user for the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SYSTEM_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. "
    "For each query-document pair, carefully analyze the semantic relationship between them, "
    "then provide your binary relevance judgment (0 for not relevant, 1 for relevant)."
)
USER_TEMPLATE = "query: {query}\ndocument: {document}\nRelevance:"
ANSWERS = ("0", "1")  # the output set; the index is the label
INVALID = -1  # a completion that is not exactly one allowed answer


class PromptError(ValueError):
    """A tokenizer or input that the prompt layout cannot use."""


def document_text(title: str, text: str) -> str:
    return f"{title} {text}".strip()


def messages(query: str, document: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(query=query, document=document)},
    ]


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "0" and "1"; an error if either answer is not exactly one token."""
    ids = []
    for answer in ANSWERS:
        toks = tokenizer.encode(answer, add_special_tokens=False)
        if len(toks) != 1:
            raise PromptError(f"answer {answer!r} is {len(toks)} tokens {toks} in this tokenizer; need 1")
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise PromptError(f"answers '0' and '1' map to the same token id {ids[0]}")
    return ids[0], ids[1]


def parse_judgment(completion: str, strict: bool = True) -> int:
    """A sampled completion -> 0, 1 or INVALID.

    strict: the completion, stripped of surrounding whitespace, is exactly "0" or "1".
    lenient: the first non-space character is the answer and no letter or digit follows it directly.
    """
    text = completion.strip()
    if strict:
        return ANSWERS.index(text) if text in ANSWERS else INVALID
    if text[:1] in ANSWERS and not text[1:2].isalnum():
        return ANSWERS.index(text[0])
    return INVALID


class PromptBuilder:
    """Token ids of (query, document) prompts under a length budget, for one tokenizer."""

    def __init__(self, tokenizer, max_length: int = 512, max_query_tokens: int = 64):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("the tokenizer has no chat template; the ProRank prompt needs one")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_query_tokens = max_query_tokens
        self.answer_ids = answer_token_ids(tokenizer)
        self.overhead = len(self._encode_rendered([self.render("", "")])[0])
        if self.overhead + max_query_tokens + 16 > max_length:
            raise PromptError(
                f"prompt.max_length {max_length} leaves no room for a document: the template takes "
                f"{self.overhead} tokens and the query up to {max_query_tokens}"
            )

    def render(self, query: str, document: str) -> str:
        return self.tokenizer.apply_chat_template(
            messages(query, document), tokenize=False, add_generation_prompt=True
        )

    def _encode_rendered(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _truncate(self, ids: list[int], limit: int, text: str) -> str:
        if len(ids) <= limit:
            return text
        # A cut inside a multi-byte character decodes to U+FFFD: drop it rather than feed it on.
        return self.tokenizer.decode(ids[:limit]).rstrip("\ufffd")

    def encode(self, query: str, document: str) -> list[int]:
        return self.encode_batch([(query, document)])[0]

    def encode_batch(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids for each (query, document text); every row fits in `max_length`."""
        for i, (query, _) in enumerate(pairs):
            if not query.strip():
                raise PromptError(f"pair {i}: empty query")
        tok = self.tokenizer
        q_ids = tok([q for q, _ in pairs], add_special_tokens=False)["input_ids"]
        d_ids = tok([d for _, d in pairs], add_special_tokens=False)["input_ids"]
        queries = [self._truncate(ids, self.max_query_tokens, q) for ids, (q, _) in zip(q_ids, pairs)]
        budgets = [
            self.max_length - self.overhead - min(len(ids), self.max_query_tokens) for ids in q_ids
        ]
        docs = [self._truncate(ids, b, d) for ids, b, (_, d) in zip(d_ids, budgets, pairs)]
        out = self._encode_rendered([self.render(q, d) for q, d in zip(queries, docs)])
        for i, ids in enumerate(out):
            # Re-tokenizing decoded text can merge across the cut and come out a few tokens
            # longer: shrink the document's budget by the excess until the prompt fits.
            while len(ids) > self.max_length and budgets[i] > 0:
                budgets[i] = max(0, budgets[i] - (len(ids) - self.max_length))
                docs[i] = self._truncate(d_ids[i], budgets[i], pairs[i][1])
                ids = self._encode_rendered([self.render(queries[i], docs[i])])[0]
            out[i] = ids
        return out


def relevance_score(answer_logits: torch.Tensor) -> torch.Tensor:
    """logit("1") - logit("0").

    answer_logits: [..., 2], the logits of the answer tokens ("0", "1") at the answer position.
    returns: [...]
    """
    return answer_logits[..., 1] - answer_logits[..., 0]

