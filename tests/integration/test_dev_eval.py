"""The driver's side of the dev evaluation: figures from an actor's scores, logged at the version they
measured; an actor lost mid-evaluation is replaced by another, at most once per actor; none ready: skipped.
The pool here is a stand-in (the real pool and vLLM scoring are tested in tests/integration/test_actors.py)."""

from __future__ import annotations

import pytest

from prorank.corpus.bm25 import bm25_search
from prorank.settings.config import BM25Config, ProRankConfig

ray = pytest.importorskip("ray")


class _Gone:
    def ping(self) -> None:
        pass


class _Pool:
    """Answers `score` with a dead actor's call first (when asked), then with the given scores."""

    def __init__(self, scores: list[float], dead_first: bool):
        self.scores, self.dead_first, self.busy = scores, dead_first, 0.0
        self.calls: list = []

    def score(self, pairs, exclude=(), judge=None):
        from prorank.actors.pool import PoolError  # noqa: PLC0415 pulls torch, which importing this module does not

        self.calls.append(set(exclude))
        if self.dead_first and not exclude:
            actor = ray.remote(_Gone).remote()
            ray.kill(actor)
            return actor.ping.remote(), "rollout-0"
        if "rollout-1" in exclude:
            raise PoolError("no rollout actor is ready to score the dev pairs")
        # Every judgment "1", then text: right on the relevant half, in the format, but for the lenient check.
        answers = ["1 yes"] * len(judge or [])
        value = {"scores": self.scores[: len(pairs)], "judgments": answers, "version": 7, "seconds": 0.5}
        return ray.put({**value, "actor": "rollout-1"}), "rollout-1"

    def scored(self, value):
        self.busy += value["seconds"]
        return value


@pytest.fixture
def dev_setup(scifact_test):

    queries = scifact_test.query_ids[:5]
    ranking = bm25_search(scifact_test, queries, BM25Config(top_k=10))
    cfg = ProRankConfig.model_validate({"train": {"dev_depth": 10}})
    # An oracle's scores: the qrels' documents first, so the reranked nDCG@10 beats BM25's.
    oracle = [float(d in scifact_test.qrels[q]) for q in queries for d, _ in ranking[q][:10]]
    return cfg, scifact_test, ranking, queries, oracle


@pytest.mark.parametrize("dead_first", [False, True])
def test_figures_at_the_version_measured_and_a_lost_actor_replaced(ray_local, dev_setup, dead_first):
    from prorank.driver.dev_eval import DevEval  # noqa: PLC0415 pulls torch, which importing this module does not

    cfg, data, ranking, queries, oracle = dev_setup
    pool = _Pool(oracle, dead_first)
    dev = DevEval(cfg, data, ranking, queries, pool)
    dev.start()
    dev.start()  # still running: skipped, not queued twice
    version, figures = dev.finished(wait=True)
    assert version == 7 and figures["dev/seconds"] == 0.5 and pool.busy == 0.5
    assert figures["dev/ndcg@10"] > figures["dev/bm25_ndcg@10"] and figures["dev/skipped"] == 1
    assert pool.calls == ([set(), {"rollout-0"}] if dead_first else [set()])
    # The balanced judgment pairs: a positive and a hard negative per query, all answered "1" (strict: out
    # of the format, which counts as wrong).
    assert 2 * sum(dev.labels) == len(dev.labels) >= 2 * len(queries)
    assert figures["dev/judgment_accuracy"] == 0 and figures["dev/judgment_format"] == 0
    assert dev.finished() is None  # nothing under way any more


def test_judgment_figures_follow_the_reward_format(ray_local, dev_setup):
    from prorank.driver.dev_eval import DevEval  # noqa: PLC0415 pulls torch, which importing this module does not

    cfg, data, ranking, queries, oracle = dev_setup
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"strict_format": False})})
    dev = DevEval(cfg, data, ranking, queries, _Pool(oracle, dead_first=False))
    dev.start()
    _, figures = dev.finished(wait=True)
    assert figures["dev/judgment_accuracy"] == 0.5 and figures["dev/judgment_format"] == 1.0


def test_no_actor_ready_skips_the_evaluation(ray_local, dev_setup):
    from prorank.driver.dev_eval import DevEval  # noqa: PLC0415 pulls torch, which importing this module does not

    cfg, data, ranking, queries, oracle = dev_setup
    pool = _Pool(oracle, dead_first=False)
    dev = DevEval(cfg, data, ranking, queries, pool)
    dev.lost = {"rollout-1"}
    dev._send()
    assert dev.pending is None and dev.skipped == 1 and dev.finished(wait=True) is None
