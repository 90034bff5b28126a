import math

import pytest
import pytrec_eval

from prorank.eval.metrics import evaluate, ranked_to_run

QRELS = {"q1": {"a": 2, "b": 1, "z": 1}, "q2": {"c": 1}, "q3": {"d": 1}}
RUN = {"q1": {"b": 3.0, "x": 2.0, "a": 1.0}, "q2": {"y": 5.0, "c": 4.0}, "q3": {}}


def test_hand_computed_values():
    m = evaluate(QRELS, RUN)
    # q1: gains b=1 at rank 1, a=2 at rank 3; ideal order a, b, z. Linear gain, as trec_eval.
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    q2 = 1 / math.log2(3)
    assert m["nDCG@10"] == pytest.approx((dcg / idcg + q2 + 0.0) / 3)
    assert m["RR@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["R@100"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_agrees_with_pytrec_eval():
    evaluator = pytrec_eval.RelevanceEvaluator(QRELS, {"ndcg_cut.10", "recip_rank", "recall.100"})
    per_query = evaluator.evaluate({q: d for q, d in RUN.items() if d})
    n = len(QRELS)  # pytrec_eval skips the empty q3; it counts as zero in ours
    m = evaluate(QRELS, RUN)
    assert m["nDCG@10"] == pytest.approx(sum(v["ndcg_cut_10"] for v in per_query.values()) / n)
    assert m["R@100"] == pytest.approx(sum(v["recall_100"] for v in per_query.values()) / n)
    assert m["RR@10"] == pytest.approx(sum(v["recip_rank"] for v in per_query.values()) / n)


def test_ranked_to_run_keeps_order():
    run = ranked_to_run({"q": ["c", "a", "b"]})
    assert sorted(run["q"], key=run["q"].get, reverse=True) == ["c", "a", "b"]


def test_no_judged_query_is_an_error():
    with pytest.raises(ValueError, match="no query of the run has qrels"):
        evaluate(QRELS, {"zz": {"a": 1.0}})
