"""`Reranker`: a trained (or any chat) causal LM as a reranker, in three lines.

    from prorank import Reranker
    reranker = Reranker("runs/train/export")          # a model folder or a hub id
    reranker.rank("what causes scurvy?", documents, top_k=3)
    reranker.rank(query, documents, first_stage_scores=bm25_scores)   # fused as the model was exported

Scores are logit("1") - logit("0") at the answer position of the mxbai-rerank-v2 prompt layout, the same
numbers `prorank eval` ranks by. With `first_stage_scores`, the ranking is by the fusion `prorank export`
stored in the model's prorank.json (chosen on held-out training queries; prorank/release/fusion.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prorank.model.models import checkpoint_model_dir, load_causal_lm, model_context
from prorank.model.prompt import PromptBuilder, check_model_layout
from prorank.release.fusion import FusionSettings, fuse_lists
from prorank.settings.config import ModelConfig


@dataclass(frozen=True)
class RankedDocument:
    index: int  # position in the documents given to `rank`
    score: float  # what the ranking is by: logit("1") - logit("0"), or the fused score
    document: str
    model_score: float | None = None  # logit("1") - logit("0") when `score` is fused


class Reranker:
    """`max_length` (query + document tokens) and `instruction` default to the settings the model was
    trained with (the prorank.json that `prorank export` writes), else 512 and none."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "float32",
        max_length: int | None = None,
        instruction: str | None = None,
        batch_size: int = 16,
    ):

        source = checkpoint_model_dir(model)
        local = {"path": source} if Path(source).is_dir() else {"hub_id": source}
        settings = check_model_layout(source)
        max_length = max_length or settings.get("max_length") or 512
        instruction = instruction or settings.get("instruction")
        self.model, self.tokenizer = load_causal_lm(ModelConfig(**local, dtype=dtype, device=device))
        self.builder = PromptBuilder(self.tokenizer, max_length, instruction, model_context(self.model))
        self.batch_size = batch_size
        self.fusion = FusionSettings(**settings["fusion"]) if settings.get("fusion") else None

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """The relevance score of each document for `query`, in the documents' order."""
        from prorank.model.scoring import score_query  # noqa: PLC0415 pulls torch, which importing this module does not

        if not documents:
            return []
        return score_query(self.model, self.builder, query, list(documents), self.batch_size)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        first_stage_scores: Sequence[float] | None = None,
    ) -> list[RankedDocument]:
        """The documents, best first (ties keep their given order); the first `top_k` when given. With
        `first_stage_scores` (the retriever's score of each document, e.g. BM25's), ranked by the model's
        fusion with them (`self.fusion`: a ValueError when the model was exported without one)."""
        scores = self.score(query, documents)
        if first_stage_scores is None:
            fused = None
        elif self.fusion is None:
            raise ValueError(
                "first_stage_scores given, but this model has no fusion in its prorank.json "
                "(prorank export --fusion wsum|rrf stores one)"
            )
        else:
            fused = fuse_lists(first_stage_scores, scores, self.fusion)
        ranked_by = fused if fused is not None else scores
        order = sorted(range(len(documents)), key=lambda i: -ranked_by[i])
        return [
            RankedDocument(i, ranked_by[i], documents[i], scores[i] if fused is not None else None)
            for i in order[:top_k]
        ]
