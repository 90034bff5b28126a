"""Several datasets in one report, on real SciFact and ArguAna: ArguAna's identical-id rule applied wherever
documents are retrieved (BM25 candidates, a run file's, dev groups, hard negatives, the fused run), the
seeded query sample shared by every system, the report's JSON, Markdown table and run files, and clear
errors for a malformed dataset declaration."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from prorank.corpus.batches import hard_negatives
from prorank.corpus.bm25 import bm25_search
from prorank.corpus.data import load_dataset
from prorank.driver.cli import app
from prorank.eval.metrics import evaluate
from prorank.eval.rerank import candidate_pairs, first_stage
from prorank.eval.runs import write_run
from prorank.release.model_card import model_card
from prorank.run.progress import progress
from prorank.settings.config import BM25Config, DataConfig, ProRankConfig
from prorank.settings.config_file import ConfigError, load_config

runner = CliRunner()


@pytest.fixture(scope="module")
def arguana(arguana_dir):
    return load_dataset(DataConfig(path=str(arguana_dir), split="test"))


def _own_ids(ranking) -> list[str]:
    return [q for q, hits in ranking.items() if any(d == q for d, _ in hits)]


def test_arguana_bm25_applies_beir_identical_id_rule(arguana, arguana_dir):
    """The rule is ArguAna's without a word in the config (prorank/corpus/data.py declares it), and it is what
    makes BM25 the figure BEIR reports: 0.493 with it, 0.366 with the query's own argument kept."""
    assert arguana.ignore_identical_ids
    ranking = bm25_search(arguana, arguana.query_ids, BM25Config(top_k=100))
    assert not _own_ids(ranking) and all(len(hits) == 100 for hits in ranking.values())
    ndcg = evaluate(arguana.eval_qrels, {q: dict(h) for q, h in ranking.items()})["nDCG@10"]
    assert abs(ndcg - 0.493) < 0.01, ndcg

    kept = load_dataset(DataConfig(path=str(arguana_dir), split="test", ignore_identical_ids=False))
    with_own = bm25_search(kept, kept.query_ids, BM25Config(top_k=100))
    assert len(_own_ids(with_own)) > 1000  # the query's own argument, mostly at rank 1
    assert abs(evaluate(kept.eval_qrels, {q: dict(h) for q, h in with_own.items()})["nDCG@10"] - 0.366) < 0.01


def test_no_query_meets_its_own_document_in_candidates_negatives_or_dev_groups(arguana, tmp_path):
    sample = arguana.sample(40, seed=0)
    ranking = bm25_search(arguana, sample, BM25Config(top_k=30))
    for qid in sample:
        assert qid not in hard_negatives(ranking, arguana.qrels, qid, 30, 1)
    pairs = candidate_pairs(arguana, ranking, 10)  # what a dev set scores (driver/dev_eval.py)
    own = {q: arguana.corpus[q].text for q in sample if q in arguana.corpus}
    assert own and all(own[q] not in [doc for _, doc in pairs[q]] for q in own)
    # A first stage of another tool that retrieved the query's own argument: dropped on reading.
    unruly = {q: [(q, 99.0)] * (q in arguana.corpus) + ranking[q] for q in sample}
    write_run(tmp_path / "other.trec", unruly, "other")
    cfg = ProRankConfig.model_validate({"bm25": {"top_k": 30}})
    _, candidates, _ = first_stage(cfg, arguana, sample, str(tmp_path / "other.trec"))
    assert not _own_ids(candidates)
    assert {q: [d for d, _ in h] for q, h in candidates.items()} == {q: [d for d, _ in ranking[q]] for q in sample}


def test_the_query_sample_is_seeded_and_in_qrels_order(arguana):
    a, b, other = arguana.sample(300, 0), arguana.sample(300, 0), arguana.sample(300, 1)
    assert a == b and a != other and len(a) == 300
    order = {q: i for i, q in enumerate(arguana.query_ids)}
    assert [order[q] for q in a] == sorted(order[q] for q in a)
    assert a != arguana.query_ids[:300]  # a sample, not the first 300
    assert arguana.sample(None, 0) == arguana.sample(5000, 0) == arguana.query_ids


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("eval.datasets=[{path: x, ignore_identical_ids: maybe}]", "eval.datasets.0.ignore_identical_ids"),
        ("eval.datasets=[{path: x, ignore_identical_id: true}]", "eval.datasets.0.ignore_identical_id"),
        ("eval.datasets=[{path: x, name: 'two words'}]", "eval.datasets.0.name"),
        ("train.dev_sets=[{path: x, queries: 0}]", "train.dev_sets.0.queries"),
        ("eval.models=[{path: x}]", "eval.models.0.name"),
    ],
)
def test_a_malformed_dataset_declaration_is_an_error_naming_its_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_two_datasets_two_models_one_report(scifact_dir, arguana_dir, tiny_model_dir, tmp_path):
    """One command: SciFact and ArguAna samples, BM25 and two models alone and fused (one fusion tuned on
    SciFact's held-out training queries serves both datasets), p-values, an average row, JSON, Markdown
    and a run file per dataset and system."""
    out, runs = tmp_path / "report.json", tmp_path / "runs"
    result = runner.invoke(
        app,
        [
            "eval",
            "--data",
            str(scifact_dir),
            "--data",
            f"args={arguana_dir}",
            "--model",
            f"a={tiny_model_dir}",
            "--model",
            f"b={tiny_model_dir}",
            "--max-queries",
            "6",
            "--fusion",
            "wsum",
            "--output",
            str(out),
            "--runs-dir",
            str(runs),
            f"data.path={scifact_dir}",
            "train.dev_queries=4",
            "eval.rerank_depth=5",
            "bm25.top_k=20",
            "prompt.max_length=64",
            "eval.seed=7",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["datasets"]) == ["scifact", "args"]
    systems = ["bm25", "a", "a+fused", "b", "b+fused"]
    for name, folder in (("scifact", scifact_dir), ("args", arguana_dir)):
        part = report["datasets"][name]
        assert [s for s in part if s in systems] == systems
        sample = load_dataset(DataConfig(path=str(folder), split="test")).sample(6, 7)
        assert part["settings"]["queries"] == 6 and part["settings"]["sample_seed"] == 7
        assert all(list(part["per_query"]["nDCG@10"][s]) == sample for s in systems)  # the same queries
        assert {r["run"] for r in part["p_values"]} | {r["against"] for r in part["p_values"]} == set(systems)
        assert {p.name for p in (runs / name).iterdir()} == {f"{s}.trec" for s in systems}
        if name == "args":
            assert part["settings"]["ignore_identical_ids"]
            assert abs(part["settings"]["first_stage_all_queries"]["nDCG@10"] - 0.493) < 0.01  # BEIR's figure
            for system in systems:
                lines = (runs / name / f"{system}.trec").read_text().splitlines()
                assert not [line for line in lines if line.split()[0] == line.split()[2]]
    mean = (report["datasets"]["scifact"]["bm25"]["nDCG@10"] + report["datasets"]["args"]["bm25"]["nDCG@10"]) / 2
    assert report["average"]["bm25"]["nDCG@10"] == pytest.approx(mean)
    fusion = report["settings"]["models"]["a"]["fusion"]
    assert fusion["tuned_on"]["dataset"] == "scifact" and fusion["tuned_on"]["split"] == "train"
    table = out.with_suffix(".md").read_text()
    assert table == report["table"] and "| scifact test | a+fused |" in table and "average of 2" in table
    card = model_card("m", [report], None, {"max_length": 64}, {})  # what `prorank export --eval` writes
    assert "## Evaluation on several datasets" in card and table in card


def test_a_bad_dataset_in_the_list_fails_before_any_work(scifact_dir, tiny_model_dir, tmp_path):
    """The second dataset has no test split: the error names it, and no report or run file is begun."""
    out = tmp_path / "out" / "report.json"
    args = ["eval", "--data", str(scifact_dir), "--data", str(tmp_path), "--model", f"m={tiny_model_dir}"]
    result = runner.invoke(app, [*args, "--output", str(out), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and f"no {tmp_path}/qrels/test.tsv" in result.output, result.output
    assert not out.parent.exists() and not (tmp_path / "runs").exists()
    result = runner.invoke(app, [*args[:3], "--model", "m=/nonexistent/model", "--model", f"n={tiny_model_dir}"])
    assert result.exit_code == 2 and "--model '/nonexistent/model': no such folder" in result.output, result.output


def test_progress_without_a_terminal_is_lines_in_a_log():
    log = io.StringIO()
    bar = progress(10, "scoring pairs", "pair", stream=log)
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines and lines[-1].startswith("scoring pairs: 100%")
    assert "10/10" in lines[-1]


def test_named_dev_sets_are_loaded_checked_and_never_see_their_own_argument(arguana_dir, scifact_dir):
    """`train.dev_sets` as the job loads them (driver/dev_eval.py), before it starts anything."""
    from prorank.driver.dev_eval import load_dev_sets  # noqa: PLC0415 pulls ray, which the other tests do not

    entry = {"path": str(arguana_dir), "split": "test", "queries": 12}
    cfg = load_config(None, [f"train.dev_sets=[{json.dumps(entry)}]", "train.dev_depth=10"])
    (dev,) = load_dev_sets(cfg, "scifact")
    assert dev.name == "arguana" and len(dev.pairs) == 12 and 0 < dev.bm25 <= 1
    assert list(dev.pairs) == dev.dataset.sample(12, cfg.train.seed)
    own = {q: dev.dataset.corpus[q].text for q in dev.pairs if q in dev.dataset.corpus}
    assert own and all(own[q] not in [doc for _, doc in dev.pairs[q]] for q in own)
    with pytest.raises(ConfigError, match="a second dev set named 'scifact'"):
        load_dev_sets(load_config(None, [f"train.dev_sets=[{{path: {scifact_dir}, queries: 3}}]"]), "scifact")
    with pytest.raises(ConfigError, match="train.best_dev 'nfcorpus' names no dev set"):
        load_dev_sets(
            load_config(None, [f"train.dev_sets=[{json.dumps(entry)}]", "train.best_dev=nfcorpus"]), "scifact"
        )


def test_a_job_with_a_dev_set_naming_nothing_fails_before_it_starts(scifact_dir, arguana_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            f"data.path={scifact_dir}",
            f"model.path={tiny_model_dir}",
            f"train.output_dir={out}",
            f"train.dev_sets=[{{path: {arguana_dir}, split: test, queries: 5}}]",
            "train.best_dev=arguana-test",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "train.best_dev 'arguana-test' names no dev set (they are: ['scifact', 'arguana'])" in result.output
    assert not out.exists()


def test_export_takes_the_fusion_of_its_own_model_from_a_report_of_several(tmp_path):
    """`prorank export --eval` of a multi-model report: the fusion applied to the model evaluated from the
    export's own folder, not another model's."""
    from prorank.driver.eval_commands import report_fusion  # noqa: PLC0415 the CLI module, imported where used

    ours, other = tmp_path / "trained", tmp_path / "zero-shot"
    fusion = {"method": "wsum", "params": {"weights": [0.7, 0.3]}}
    report = {
        "datasets": {},
        "settings": {
            "models": {
                "zero-shot": {"source": str(other), "fusion": {"method": "wsum", "params": {"weights": [0.9, 0.1]}}},
                "trained": {"source": str(ours), "fusion": fusion},
            }
        },
    }
    assert report_fusion(report, ours) == fusion
    assert report_fusion(report, tmp_path / "elsewhere") is None
    assert report_fusion({"settings": {"fusion": fusion}}, tmp_path) == fusion  # a single-model report


def test_a_model_of_the_list_without_a_dtype_takes_the_configs():
    from prorank.eval.benchmark import models_of  # noqa: PLC0415 pulls torch, which the other tests need not

    cfg = load_config(
        None, ["model.dtype=auto", "eval.models=[{path: a, name: a}, {path: b, name: b, dtype: float32}]"]
    )
    assert [(m.name, m.dtype) for m in models_of(cfg)] == [("a", "auto"), ("b", "float32")]
