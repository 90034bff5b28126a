"""The one definition of the ProRank prompt, its answer tokens, the relevance score and the judgment parser.

The layout is the one the released ProRank models (mixedbread-ai/mxbai-rerank-base-v2 / large-v2) were
trained on, built as their package `mxbai-rerank` (`MxbaiRerankV2.prepare_inputs`) builds it: from pieces
tokenized separately and concatenated as token ids, never rendered through the model's chat template:

    <|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n  [instruction: {instruction}\\n]query: {query}  \\n  document: {document}  \\n
    You are a search relevance expert ... (0 for not relevant, 1 for relevant).\\nRelevance:
    <|im_end|>\\n<|im_start|>assistant\\n

`max_length` is the budget of the query and document part (as `MxbaiRerankV2(max_length=...)`); the fixed
pieces (`PromptBuilder.overhead` tokens) come on top. The query piece is cut at 3/4 of the budget, and the
"\\n" + document piece is cut at its end so that both fit. The score is logit("1") - logit("0") at the last
prompt token, which predicts the assistant's first token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LAYOUT = "mxbai-v2"  # what prorank.json records; models trained before it carry no layout
LEGACY_LAYOUT = "chat-template"  # the layout of models exported before this one (no "layout" key)
CHAT_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
SEP = "\n"
INSTRUCTION_TEMPLATE = "instruction: {instruction}"
QUERY_TEMPLATE = "query: {query}"
DOCUMENT_TEMPLATE = "document: {document}"
TASK_PROMPT = (
    "You are a search relevance expert who evaluates how well documents match search queries. "
    "For each query-document pair, carefully analyze the semantic relationship between them, "
    "then provide your binary relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
ANSWERS = ("0", "1")  # the output set; the index is the label
INVALID = -1  # a completion that is not exactly one allowed answer


class PromptError(ValueError):
    """A tokenizer, input or model that the prompt layout cannot use."""


def document_text(title: str, text: str) -> str:
    return f"{title} {text}".strip()


def query_piece(query: str, instruction: str | None = None) -> str:
    """The text of the query piece, with the instruction before it when one is given."""
    text = QUERY_TEMPLATE.format(query=query)
    return SEP.join([INSTRUCTION_TEMPLATE.format(instruction=instruction), text]) if instruction else text


def prompt_text(query: str, document: str, instruction: str | None = None) -> str:
    """The whole prompt as text, untruncated (what the exported chat template renders)."""
    return (
        CHAT_PREFIX
        + query_piece(query, instruction)
        + SEP
        + DOCUMENT_TEMPLATE.format(document=document)
        + SEP
        + TASK_PROMPT
        + CHAT_SUFFIX
    )


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
    """Token ids of (query, document) prompts in the released layout, for one tokenizer.

    max_length: tokens of the query and document part, the fixed pieces excluded.
    limit: the most tokens a whole prompt may have (the model's context, or an engine's); as
      `MxbaiRerankV2` does with the model's `max_position_embeddings`, max_length shrinks to fit it.
    """

    def __init__(self, tokenizer, max_length: int = 512, instruction: str | None = None, limit: int | None = None):
        self.tokenizer = tokenizer
        self.instruction = instruction or None
        self.answer_ids = answer_token_ids(tokenizer)
        prefix, suffix, sep, task = self._tokenize([CHAT_PREFIX, CHAT_SUFFIX, SEP, TASK_PROMPT])
        self.prefix, self.sep, self.tail = prefix, sep, sep + task + suffix
        self.overhead = len(prefix) + len(self.tail)
        if limit is not None and max_length + self.overhead > limit:
            max_length = limit - self.overhead
        if max_length < 8:
            raise PromptError(
                f"prompt.max_length {max_length} leaves no room for a query and a document: the layout's "
                f"fixed pieces take {self.overhead} tokens of the {limit} the model or engine takes"
            )
        self.max_length = max_length
        self.max_query_tokens = max_length * 3 // 4  # the released cut: more room for the document

    @classmethod
    def from_config(cls, tokenizer, prompt, limit: int | None = None) -> PromptBuilder:
        """From a `PromptConfig`; `limit` as in the class docstring."""
        return cls(tokenizer, prompt.max_length, prompt.instruction, limit)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, query: str, document: str) -> list[int]:
        return self.encode_batch([(query, document)])[0]

    def encode_batch(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Token ids for each (query, document text); each row is at most max_length + overhead long."""
        for i, (query, _) in enumerate(pairs):
            if not query.strip():
                raise PromptError(f"pair {i}: empty query")
        queries = self._tokenize([query_piece(q, self.instruction) for q, _ in pairs])
        documents = self._tokenize([DOCUMENT_TEMPLATE.format(document=d) for _, d in pairs])
        out = []
        for q, d in zip(queries, documents):
            q = q[: self.max_query_tokens]
            body = (q + self.sep + d)[: self.max_length]  # only the document side is cut (q < max_length)
            out.append(self.prefix + body + self.tail)
        return out

    def settings(self) -> dict[str, object]:
        """What prorank.json and reports record of the prompt."""
        return {
            "layout": LAYOUT,
            "max_length": self.max_length,
            "instruction": self.instruction,
            "overhead_tokens": self.overhead,
        }


def model_prompt_settings(model: str) -> dict:
    """The prompt settings a model folder was trained with (its prorank.json), or {} when it has none
    (a base model, a hub id, a released model). A prorank.json without a layout predates this one
    (`check_layout` reads it so)."""
    path = Path(model) / "prorank.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PromptError(f"{path}: not valid JSON ({err})") from None
    return settings


def check_layout(settings: dict, source: str, layout: str = LAYOUT) -> dict:
    """Prompt settings as a model's prorank.json or its run's summary recorded them, with their layout
    (none recorded: the legacy one); an error naming both layouts if it is not `layout`."""
    settings = {"layout": LEGACY_LAYOUT, **settings}
    if settings["layout"] != layout:
        raise PromptError(
            f"{source} was trained with prompt layout {settings['layout']!r} while prompt.layout is {layout!r}: "
            "its scores would not mean what they meant in training (train it again in this layout)"
        )
    return settings


def check_model_layout(model: str, layout: str = LAYOUT) -> dict:
    """The model's prompt settings ({} without a prorank.json); an error if it was trained on another layout."""
    settings = model_prompt_settings(model)
    return check_layout(settings, f"{model} ({Path(model) / 'prorank.json'})", layout) if settings else {}


def relevance_score(answer_logits: torch.Tensor) -> torch.Tensor:
    """logit("1") - logit("0").

    answer_logits: [..., 2], the logits of the answer tokens ("0", "1") at the answer position.
    returns: [...]
    """
    return answer_logits[..., 1] - answer_logits[..., 0]
