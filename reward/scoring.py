"""The reward of a sampled judgment: pure functions, used by the service and in-process alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean, pstdev

from prorank.model.prompt import INVALID, parse_judgment
from prorank.settings.config import RewardConfig


@dataclass(frozen=True, slots=True)
class CompletionScore:
    format: float
    relevance: float
    total: float
    judgment: int


def label_of(qrels_for_query: dict[str, int], doc_id: str, threshold: int) -> int:
    """1 when the document's qrel score reaches `threshold`; documents absent from the qrels are 0."""
    return int(qrels_for_query.get(doc_id, 0) >= threshold)


def score_completions(completions: Sequence[str], label: int, cfg: RewardConfig) -> list[CompletionScore]:
    """Format reward (exactly one allowed answer), relevance reward (the answer equals `label`) and
    their weighted total, for each completion of one group."""
    out = []
    for text in completions:
        judgment = parse_judgment(text, strict=cfg.strict_format)
        fmt = float(judgment != INVALID)
        rel = float(judgment == label)
        out.append(CompletionScore(fmt, rel, cfg.format_weight * fmt + cfg.relevance_weight * rel, judgment))
    return out


def group_stats(scores: Sequence[CompletionScore]) -> tuple[float, float]:
    """Mean and population std of the group's totals (what GRPO normalises with)."""
    totals = [s.total for s in scores]
    return fmean(totals), pstdev(totals)


def informative(totals: Sequence[float], tolerance: float = 0.0) -> bool:
    """Whether a group's G rewards spread (population std, what GRPO normalises with) by more than
    `tolerance`: a group that does not gives GRPO no gradient (dynamic sampling drops it)."""
    return len(totals) > 1 and pstdev(totals) > tolerance
