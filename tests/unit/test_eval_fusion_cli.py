"""`prorank eval --candidates/--run-out/--fusion`, `prorank export --fusion`, `prorank compare` and
`Reranker.rank(first_stage_scores=...)` end to end on real SciFact, with the tiny model and real ranx."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prorank import Reranker
from prorank.driver.cli import app
from prorank.eval.runs import read_run
from prorank.release.fusion import FusionSettings, fuse_lists

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _config(tmp_path, scifact_dir, model_dir, **eval_keys) -> str:
    path = tmp_path / "eval.yaml"
    keys = {"rerank_depth": 5, "max_queries": 6, "tensorboard_dir": str(tmp_path / "tb"), **eval_keys}
    path.write_text(
        f"data: {{path: {scifact_dir}, split: test}}\nmodel: {{path: {model_dir}}}\n"
        f"prompt: {{max_length: 96}}\nbm25: {{top_k: 20}}\ntrain: {{dev_queries: 5, seed: 3}}\n"
        f"eval: {json.dumps(keys)}\n"
    )
    return str(path)


def test_a_written_run_reranked_as_candidates_gives_the_same_figures(scifact_dir, scifact_test, tmp_path):
    first = _run(
        "eval",
        "--data",
        scifact_dir,
        "--max-queries",
        40,
        "--top-k",
        50,
        "--run-out",
        tmp_path / "bm25.trec",
        "--output",
        tmp_path / "bm25.json",
        f"eval.tensorboard_dir={tmp_path}/tb",
    )
    assert first.exit_code == 0, first.output
    again = _run(
        "eval",
        "--data",
        scifact_dir,
        "--max-queries",
        40,
        "--top-k",
        50,
        "--candidates",
        tmp_path / "bm25.trec",
        "--output",
        tmp_path / "again.json",
        f"eval.tensorboard_dir={tmp_path}/tb",
    )
    assert again.exit_code == 0, again.output
    a, b = json.loads((tmp_path / "bm25.json").read_text()), json.loads((tmp_path / "again.json").read_text())
    assert a["bm25"] == b["first_stage"] and b["settings"]["first_stage"].startswith("run file")
    per_query = a["per_query"]["nDCG@10"]["bm25"]
    assert len(per_query) == 40 and per_query == b["per_query"]["nDCG@10"]["first_stage"]
    assert sum(per_query.values()) / 40 == pytest.approx(a["bm25"]["nDCG@10"])
    run = read_run(tmp_path / "bm25.trec", scifact_test.queries, scifact_test.corpus)
    assert len(run) == 40 and all(len(hits) == 50 for hits in run.values())


def test_bad_candidate_runs_are_refused_before_any_scoring(scifact_dir, tiny_model_dir, tmp_path):
    (tmp_path / "c.trec").write_text("1 Q0 4983 1 2.0 bm25\n1 Q0 no-such-doc 2 1.0 bm25\n")
    res = _run(
        "eval",
        "--config",
        _config(tmp_path, scifact_dir, tiny_model_dir),
        "--candidates",
        tmp_path / "c.trec",
        "--output",
        tmp_path / "out.json",
        "--run-out",
        tmp_path / "out.trec",
    )
    assert res.exit_code == 2 and "c.trec:2: unknown document id 'no-such-doc'" in res.output
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.trec").exists()
    (tmp_path / "c.trec").write_text("1 Q0 4983 1 2.0 bm25\n")
    res = _run(
        "eval",
        "--config",
        _config(tmp_path, scifact_dir, tiny_model_dir),
        "--candidates",
        tmp_path / "c.trec",
        "--fusion",
        "wsum",
    )
    assert res.exit_code == 2 and "eval.fusion_candidates" in res.output
    res = _run("eval", "--data", scifact_dir, "--all-runs")
    assert res.exit_code == 2 and "give eval.run_out" in res.output
    res = _run("eval", "--data", scifact_dir, "--fusion", "rrf")
    assert res.exit_code == 2 and "give a model" in res.output


def test_fusion_tuned_on_held_out_training_queries_exported_and_applied(scifact_dir, tiny_model_dir, tmp_path):

    config = _config(tmp_path, scifact_dir, tiny_model_dir)
    res = _run(
        "eval",
        "--config",
        config,
        "--fusion",
        "wsum",
        "--output",
        tmp_path / "r.json",
        "--run-out",
        tmp_path / "runs" / "test.trec",
        "--all-runs",
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"bm25", "model", "fused"} and "fused: wsum" in res.output
    tuned = report["settings"]["fusion"]["tuned_on"]
    assert tuned["split"] == "train" and tuned["queries"] == 5 and tuned["rerank_depth"] == 5
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["test.bm25.trec", "test.model.trec", "test.trec"]
    assert set(report["per_query"]["nDCG@10"]) == {"bm25", "model", "fused"}

    res = _run(
        "compare",
        tmp_path / "runs" / "test.bm25.trec",
        tmp_path / "runs" / "test.model.trec",
        tmp_path / "runs" / "test.trec",
        "--qrels",
        scifact_dir / "qrels" / "test.tsv",
        "--output",
        tmp_path / "cmp.json",
    )
    assert res.exit_code == 0, res.output
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert len(cmp["p_values"]) == 9 and "p-value" in res.output  # 3 pairs x 3 measures

    # export --fusion tunes the same way (same held-out queries, same figures) and stores it
    res = _run(
        "export",
        tiny_model_dir,
        "--output",
        tmp_path / "exported",
        "--config",
        config,
        "--fusion",
        "wsum",
        "--eval",
        tmp_path / "r.json",
    )
    assert res.exit_code == 0, res.output
    stored = json.loads((tmp_path / "exported" / "prorank.json").read_text())["fusion"]
    assert stored["params"] == report["settings"]["fusion"]["params"]
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "## Fusion with the first stage" in card and "first_stage_scores=" in card and "fused with" in card

    reranker = Reranker(str(tmp_path / "exported"))
    docs, first = ["aspirin lowers fever", "the sky is blue", "fever and pain relief"], [3.0, 0.5, 2.0]
    hits = reranker.rank("what treats a fever?", docs, first_stage_scores=first)
    expected = fuse_lists(first, reranker.score("what treats a fever?", docs), FusionSettings(**stored))
    assert [h.score for h in hits] == pytest.approx(sorted(expected, reverse=True))
    assert all(h.model_score is not None for h in hits)
    with pytest.raises(ValueError, match="no fusion"):
        Reranker(str(tiny_model_dir)).rank("q", docs, first_stage_scores=first)

    # the exported model's eval applies its stored fusion (auto), without tuning again
    exported_config = _config(tmp_path, scifact_dir, tmp_path / "exported")
    res = _run("eval", "--config", exported_config, "--output", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["settings"]["fusion"] == stored and again["fused"] == report["fused"]
