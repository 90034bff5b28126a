"""`Reranker`: a trained (or any chat) causal LM as a reranker, in three lines.

    from prorank import Reranker
    reranker = Reranker("runs/train/export")          # a model folder or a hub id
    reranker.rank("what causes scurvy?", documents, top_k=3)

Scores are logit("1") - logit("0") at the answer position of the mxbai-rerank-v2 prompt layout, the same
numbers `prorank eval` ranks by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RankedDocument:
    index: int  # position in the documents given to `rank`
    score: float  # logit("1") - logit("0")
    document: str


class Reranker:
    """`max_length` (query + document tokens) and `instruction` default to the settings the model was
    trained with (the prorank.json that `prorank export` writes), else 512 and none."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "float32", max_length: int | None = None,
                 instruction: str | None = None, batch_size: int = 16):
        from prorank.config import ModelConfig
        from prorank.models import checkpoint_model_dir, load_causal_lm, model_context
        from prorank.prompt import PromptBuilder, check_model_layout

        source = checkpoint_model_dir(model)
        local = {"path": source} if Path(source).is_dir() else {"hub_id": source}
        settings = check_model_layout(source)
        max_length = max_length or settings.get("max_length") or 512
        instruction = instruction or settings.get("instruction")
        self.model, self.tokenizer = load_causal_lm(ModelConfig(**local, dtype=dtype, device=device))
        self.builder = PromptBuilder(self.tokenizer, max_length, instruction, model_context(self.model))
        self.batch_size = batch_size

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """The relevance score of each document for `query`, in the documents' order."""
        from prorank.scoring import score_query

        if not documents:
            return []
        return score_query(self.model, self.builder, query, list(documents), self.batch_size)

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None) -> list[RankedDocument]:
        """The documents, best first (ties keep their given order); the first `top_k` when given."""
        scores = self.score(query, documents)
        order = sorted(range(len(documents)), key=lambda i: -scores[i])
        return [RankedDocument(i, scores[i], documents[i]) for i in order[:top_k]]
