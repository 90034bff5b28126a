"""Dynamic sampling in the warmup (driver/warmup_stage.py): which groups count as informative, how a step's
batch is chosen from what it drew, and the refill rounds, on a stand-in pool and reward service. The real
job (async, to the bound) is in tests/integration/test_train_job.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from prorank.corpus.batches import PromptSampler
from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import load_local
from prorank.driver.warmup_stage import Drawn, WarmupStage
from prorank.reward.scoring import informative
from prorank.run.rollout import Completion, GroupResult, RolloutRequest
from prorank.settings.config import BM25Config, TrainConfig
from prorank.settings.stage_config import WarmupConfig


def test_spread_tolerance_on_graded_rewards():
    assert not informative([1.0, 1.0, 1.0, 1.0])  # one reward: no gradient
    assert informative([1.0, 1.02, 1.0, 0.98])  # exact check: any spread counts
    assert not informative([1.0, 1.02, 1.0, 0.98], tolerance=0.05)  # std 0.0141: "all about equal"
    assert informative([0.0, 2.0, 0.0, 0.0], tolerance=0.5)  # std 0.866
    assert not informative([2.0, 2.0, 1.0, 1.0], tolerance=0.5)  # std exactly 0.5: at most the tolerance
    assert not informative([2.0])  # a single completion has nothing to compare with


def _answer(totals: list[float], label: int = 1):
    rewards = [SimpleNamespace(total=t, format=1.0, relevance=float(t > 1), judgment=1) for t in totals]
    return SimpleNamespace(rewards=rewards, error="", label=label, request_id="")


def _result(request_id: str, version: int = 0) -> GroupResult:
    completion = Completion([15], [-0.5], "1", 1)
    return GroupResult(request_id, "q", request_id, [1, 2, 3], [completion] * 4, version, "rollout-0", 0.1)


FLAT, MIXED = [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 1.0]


def test_without_refills_the_step_trains_on_its_own_batch():
    drawn = Drawn([_result(f"s0-{i}") for i in range(4)], [_answer(MIXED), _answer(FLAT)] * 2)
    groups, figures = drawn.batch(4, tolerance=0.0)
    assert [g.rewards for g in groups] == [MIXED, FLAT, MIXED, FLAT]
    assert figures["rollout/useful_groups"] == 2 and figures["rollout/dropped_share"] == 0
    assert figures["rollout/refill_rounds"] == 0 and figures["rollout/short_groups"] == 0


def test_after_refills_informative_groups_first_topped_up_at_the_bound():
    drawn = Drawn([_result(f"s0-{i}") for i in range(4)], [_answer(FLAT)] * 3 + [_answer(MIXED)])
    drawn.add([_result(f"s0r1-{i}") for i in range(4)], [_answer(FLAT), _answer(MIXED)] * 2, regenerated=0)
    groups, figures = drawn.batch(4, tolerance=0.0)
    assert [g.rewards for g in groups] == [MIXED, MIXED, MIXED, FLAT]  # 3 informative, then the first dropped
    assert figures["rollout/useful_groups"] == 3 and figures["rollout/short_groups"] == 1
    assert figures["rollout/dropped_share"] == pytest.approx(5 / 8) and figures["rollout/refill_rounds"] == 1


class _Prompts:
    """Step 0's batch teaches nothing; each refill's prompts teach when their document id says so."""

    def __init__(self):
        self.asked: list[tuple[int, int, int]] = []

    def batch(self, step, size, refill=0):
        self.asked.append((step, size, refill))
        useful = refill == 2  # the first refill is no better than the batch; the second is
        return [
            RolloutRequest(f"s{step}r{refill}-{i}", "q", f"{'mixed' if useful else 'flat'}-{i}", "q", "d")
            for i in range(size)
        ]


class _Pool:
    def __init__(self, version: int):
        self.version, self.waiting = version, list[GroupResult]()

    def submit(self, requests):
        self.waiting += [_result(r.request_id, self.version) for r in requests]

    def poll(self, timeout=1.0):
        done, self.waiting = self.waiting, []
        return done


class _Rewards:
    def score(self, groups):
        return [_answer(MIXED if g.request_id.startswith("s3r2") else FLAT) for g in groups]


def _stage(rounds: int, version: int = 3, staleness: int = 1) -> SimpleNamespace:
    warmup = WarmupConfig(dynamic_sampling=True, dynamic_sampling_rounds=rounds, max_staleness=staleness)
    job = SimpleNamespace(cfg=SimpleNamespace(warmup=warmup), pool=_Pool(version), prompts=_Prompts())
    return SimpleNamespace(job=job, batch_size=8, inbox={}, rewards=_Rewards())


def test_refills_draw_fresh_prompts_until_the_step_is_full():
    stage = _stage(rounds=3)
    first = [_result(f"s3-{i}", version=2) for i in range(8)]
    drawn = WarmupStage.refill(stage, 3, Drawn(first, _Rewards().score(first)))
    # No informative group yet: 4x the 8 missing, twice; the second refill fills the step, the third is not drawn.
    assert stage.job.prompts.asked == [(3, 32, 1), (3, 32, 2)]
    groups, figures = drawn.batch(8, tolerance=0.0)
    assert all(g.rewards == MIXED for g in groups) and figures["rollout/short_groups"] == 0
    assert figures["rollout/refill_rounds"] == 2 and figures["rollout/dropped_share"] == pytest.approx(40 / 72)


def test_refills_stop_at_the_bound_and_keep_the_staleness_bound():
    stage = _stage(rounds=1, version=1, staleness=1)  # the actors serve version 1 at step 3: 2 behind
    first = [_result(f"s3-{i}", version=2) for i in range(8)]
    drawn = WarmupStage.refill(stage, 3, Drawn(first, _Rewards().score(first)))
    assert stage.job.prompts.asked == [(3, 32, 1)]
    # The refill's groups were too stale: each generated again (by the same stand-in pool, still at 1).
    assert drawn.regenerated == 32 and all(r.request_id.endswith("+") for r in drawn.results[8:])
    _, figures = drawn.batch(8, tolerance=0.0)
    assert figures["rollout/short_groups"] == 8 and figures["rollout/dropped_share"] == 1


def test_refill_prompts_are_fresh_and_seeded(scifact_dir):
    data = load_local(scifact_dir, "train")
    ranking = bm25_search(data, data.query_ids[:40], BM25Config(top_k=30))
    prompts = PromptSampler(data, ranking, TrainConfig(max_train_queries=30, dev_queries=5), WarmupConfig())
    own, refill = prompts.batch(4, 8), prompts.batch(4, 8, refill=1)
    assert own == prompts.batch(4, 8, refill=0) and refill == prompts.batch(4, 8, refill=1)  # pure functions
    assert {r.request_id for r in own}.isdisjoint(r.request_id for r in refill)  # the inbox keys them apart
    assert [(r.query_id, r.doc_id) for r in own] != [(r.query_id, r.doc_id) for r in refill]
    assert all(r.request_id.startswith("s4r1-") for r in refill)
