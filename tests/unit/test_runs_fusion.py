"""TREC run files, ranx fusion and `prorank compare`: hand-computed values, real SciFact qrels, real ranx."""

from __future__ import annotations

import pytest

from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import DataError
from prorank.eval.compare import compare_runs, p_values, read_qrels
from prorank.eval.runs import RunFileError, monotone, read_run, write_run
from prorank.release.fusion import FusionSettings, fuse, fuse_lists, tune
from prorank.settings.config import BM25Config

QUERIES, CORPUS = {"q1", "q2"}, {"a", "b", "c", "d"}


def _run_file(tmp_path, text: str | bytes):
    path = tmp_path / "run.trec"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_read_run_orders_by_score_then_rank_and_cuts_at_top_k(tmp_path):
    path = _run_file(tmp_path, "q1 Q0 a 2 1.5 x\nq1 Q0 b 1 3.0 x\n\nq1 Q0 c 3 1.5 x\nq2 Q0 d 1 -2 x\n")
    assert read_run(path, QUERIES, CORPUS) == {"q1": [("b", 3.0), ("a", 1.5), ("c", 1.5)], "q2": [("d", -2.0)]}
    assert read_run(path, QUERIES, CORPUS, top_k=2)["q1"] == [("b", 3.0), ("a", 1.5)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("q1 Q0 a 1 2.0", "run.trec:2: expected 6 columns `qid Q0 docid rank score tag`, got 5"),
        ("q1 Q0 a one 2.0 x", "run.trec:2: rank 'one' is not an integer"),
        ("q1 Q0 a 1 high x", "run.trec:2: score 'high' is not a number"),
        ("q1 Q0 a 1 nan x", "run.trec:2: score 'nan' is not finite"),
        ("q9 Q0 a 1 2.0 x", "run.trec:2: unknown query id 'q9'"),
        ("q1 Q0 zz 1 2.0 x", "run.trec:2: unknown document id 'zz'"),
        ("q1 Q0 b 2 2.0 x", "run.trec:2: document 'b' appears twice for query 'q1'"),
    ],
)
def test_a_bad_run_line_is_named_by_file_and_line(tmp_path, line, message):
    path = _run_file(tmp_path, f"q1 Q0 b 1 3.0 x\n{line}\n")
    with pytest.raises(RunFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_run(path, QUERIES, CORPUS)


def test_non_utf8_and_empty_run_files_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"run.trec:2: not UTF-8"):
        read_run(_run_file(tmp_path, b"q1 Q0 a 1 1 x\nq1 Q0 \xff 2 0 x\n"), QUERIES, CORPUS)
    with pytest.raises(RunFileError, match="no run lines"):
        read_run(_run_file(tmp_path, "\n\n"), QUERIES, CORPUS)
    with pytest.raises(RunFileError, match="no such run file"):
        read_run(tmp_path / "missing.trec", QUERIES, CORPUS)


def test_monotone_scores_keep_the_order_and_round_trip_through_a_run_file(tmp_path):
    ranked = monotone([("b", 2.0), ("a", 2.0), ("c", 5.0)], below=["d"])
    assert [d for d, _ in ranked] == ["b", "a", "c", "d"]
    scores = [s for _, s in ranked]
    assert scores[0] == 2.0 and all(x > y for x, y in zip(scores, scores[1:]))
    path = write_run(tmp_path / "out" / "r.trec", {"q1": ranked}, "my tag")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 b 1 2 mytag" and len(lines) == 4
    assert [d for d, _ in read_run(path, QUERIES, CORPUS)["q1"]] == ["b", "a", "c", "d"]
    assert not list(path.parent.glob(".*tmp"))


def test_wsum_and_rrf_fusion_match_hand_computed_values():
    wsum = FusionSettings(method="wsum", params={"weights": [0.25, 0.75]}, norm="min-max")
    # min-max: first stage [10, 5, 0] -> [1, .5, 0]; model [-1, 3, 1] -> [0, 1, .5]
    assert fuse_lists([10, 5, 0], [-1, 3, 1], wsum) == pytest.approx([0.25, 0.875, 0.375])
    rrf = FusionSettings(method="rrf", params={"k": 10})
    # ranks: first stage 1, 2, 3; model 3, 1, 2
    assert fuse_lists([10, 5, 0], [-1, 3, 1], rrf) == pytest.approx([1 / 11 + 1 / 13, 1 / 12 + 1 / 11, 1 / 13 + 1 / 12])
    assert fuse_lists([], [], wsum) == []
    with pytest.raises(ValueError, match="2 first-stage scores for 3 documents"):
        fuse_lists([1, 2], [1, 2, 3], wsum)
    assert "0.25 x first stage + 0.75 x model" in wsum.describe() and "k = 10" in rrf.describe()


def test_tuning_finds_the_weight_where_fusion_beats_both_runs():
    # q1: the first stage is right by a wide margin, the model wrong by a narrow one; q2 (and q3): the other
    # way round. Min-max normalised: q1 ranks a first iff w_first > w_model / 5, q2 ranks b first iff
    # w_model > w_first / 10, so weights between those get every query right and neither run alone does.
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"b": 1}}
    first = {"q1": {"a": 1.0, "b": 0.5, "c": 0.0}, **{q: {"a": 1.0, "b": 0.9, "c": 0.0} for q in ("q2", "q3")}}
    model = {"q1": {"a": 0.9, "b": 1.0, "c": 0.0}, **{q: {"a": 0.0, "b": 1.0, "c": 0.5} for q in ("q2", "q3")}}
    chosen = tune(qrels, first, model, "wsum", weight_step=0.1)
    figures = chosen.tuned_on["ndcg@10"]
    assert figures["fused"] == pytest.approx(1.0) and figures["fused"] > max(figures["first_stage"], figures["model"])
    first_w, model_w = chosen.params["weights"]
    assert first_w + model_w == pytest.approx(1.0) and model_w / 5 < first_w < 10 * model_w
    assert fuse(first, model, chosen)["q1"]["a"] > fuse(first, model, chosen)["q1"]["b"]
    assert tune(qrels, first, model, "rrf").params["k"] in range(10, 101, 10)


def test_compare_reads_beir_and_trec_qrels_and_tests_significance(scifact_dir, scifact_test, tmp_path):

    qids = scifact_test.query_ids[:60]
    bm25 = bm25_search(scifact_test, qids, BM25Config(top_k=20))
    write_run(tmp_path / "bm25.trec", {q: monotone(h) for q, h in bm25.items()}, "bm25")
    # A run that puts each query's judged documents first: far better, significantly so on 60 queries.
    oracle = {
        q: monotone(
            [(d, 1.0) for d in scifact_test.qrels[q]] + [(d, 0.0) for d, _ in h if d not in scifact_test.qrels[q]]
        )
        for q, h in bm25.items()
    }
    write_run(tmp_path / "oracle.trec", oracle, "oracle")
    trec_qrels = tmp_path / "qrels.txt"
    trec_qrels.write_text("".join(f"{q} 0 {d} {g}\n" for q in qids for d, g in scifact_test.eval_qrels[q].items()))
    beir_qrels = read_qrels(scifact_dir / "qrels" / "test.tsv")
    assert read_qrels(trec_qrels) == {q: beir_qrels[q] for q in qids}
    report = compare_runs(trec_qrels, [tmp_path / "bm25.trec", tmp_path / "oracle.trec"], "student", 0.05)
    assert report.results["oracle"]["ndcg@10"] == pytest.approx(1.0)
    assert 0.5 < report.results["bm25"]["ndcg@10"] < 0.9
    rows = {(a, b, m): (p, sig) for a, b, m, p, sig in p_values(report)}
    p, significant = rows[("bm25", "oracle", "nDCG@10")]
    assert p < 0.05 and significant
    beir = compare_runs(
        scifact_dir / "qrels" / "test.tsv", [tmp_path / "bm25.trec", tmp_path / "oracle.trec"], "fisher", 0.05
    )
    assert beir.results["bm25"]["ndcg@10"] < report.results["bm25"]["ndcg@10"]  # 300 queries, 240 with no line
    (tmp_path / "bad.trec").write_text("1 Q0 4983 1 2.0\n")
    with pytest.raises(RunFileError, match="bad.trec:1: expected 6 columns"):
        compare_runs(trec_qrels, [tmp_path / "bm25.trec", tmp_path / "bad.trec"])
