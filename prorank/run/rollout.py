"""What travels from actors to reward and learner: a judgment request and its group of G completions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    """One (query, document) prompt to judge G times. `request_id` is unique within a batch."""

    request_id: str
    query_id: str
    doc_id: str
    query: str
    document: str


@dataclass(slots=True)
class Completion:
    token_ids: list[int]  # sampled tokens, the stop token included when one was sampled
    logprobs: list[float]  # the behaviour policy's logprob of each sampled token
    text: str
    judgment: int  # 0, 1 or prompt.INVALID
    finish_reason: str | None = None


@dataclass(slots=True)
class GroupResult:
    """The G completions of one request, tagged with the weights version that produced them."""

    request_id: str
    query_id: str
    doc_id: str
    prompt_ids: list[int]
    completions: list[Completion]
    version: int
    actor: str = ""
    seconds: float = 0.0  # wall time of the chunk this group was generated in

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(slots=True)
class ScoredGroup:
    """What the learner trains on: one prompt, its G sampled completions, their rewards."""

    prompt_ids: list[int]
    completions: list[list[int]]  # G token id lists
    behaviour_logprobs: list[list[float]]  # the actors' logprob of each sampled token
    rewards: list[float]  # G totals from the reward service
    version: int = 0  # weights version that sampled it

    @classmethod
    def from_result(cls, result: GroupResult, rewards: list[float]) -> ScoredGroup:
        return cls(
            result.prompt_ids,
            [c.token_ids for c in result.completions],
            [c.logprobs for c in result.completions],
            list(rewards),
            result.version,
        )
