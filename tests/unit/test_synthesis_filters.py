"""Query synthesis without an engine, on real SciFact documents: how an answer becomes a query, each filter
and its count, the document draw, the resumable log, the BEIR folder, and the errors given before any work.
The actors writing the queries are tests/integration/test_synthesis.py's."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from prorank.corpus.data import DataError, load_corpus, load_dataset
from prorank.corpus.query_filters import run_filters
from prorank.corpus.query_writing import clean_query, finished, longest_copied_run, malformed
from prorank.corpus.synthetic_dataset import GenerationLog, write_beir_folder
from prorank.driver import synthesis as synthesis_driver
from prorank.driver.cli import app
from prorank.driver.synthesis import pick_documents, synthesize
from prorank.settings.config import BM25Config, DataConfig
from prorank.settings.config_file import load_config
from prorank.settings.synth_config import DEFAULT_STRIP, SynthesisConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(scifact_dir):
    return load_corpus(scifact_dir)


def _cfg(scifact_dir, tmp_path, **updates) -> SynthesisConfig:
    return SynthesisConfig(corpus=str(scifact_dir), output=str(tmp_path / "synth"), **updates)


def test_an_answer_loses_its_stock_prefix_quotes_and_second_sentence():
    assert clean_query("The main finding of this abstract is that IL-13 drives fibrosis.", DEFAULT_STRIP) == (
        "IL-13 drives fibrosis."
    )
    assert (
        clean_query('Sentence: "aspirin lowers stroke risk." More text', DEFAULT_STRIP) == "Aspirin lowers stroke risk."
    )
    assert clean_query("This study found that X binds Y. It also found Z.", DEFAULT_STRIP) == "X binds Y."
    assert clean_query("A is B. C is D. E is F.", DEFAULT_STRIP, sentences=2) == "A is B. C is D."
    assert clean_query("\n\n  ", DEFAULT_STRIP) == ""
    # Cut by max_tokens: usable only when a whole first sentence came before the cut.
    assert finished("X binds Y. The study also", "length") and not finished("X binds Y and the", "length")
    assert finished("X binds Y", "stop")


def test_malformed_names_why(corpus, scifact_dir, tmp_path):
    cfg = _cfg(scifact_dir, tmp_path)
    doc = next(d for d in corpus.values() if len(d.text.split()) > 60)
    assert malformed("", doc, cfg) == "empty"
    assert malformed("Aspirin works", doc, cfg) == "too_short"
    assert malformed(" ".join(["word"] * 2 + [f"w{i}" for i in range(45)]), doc, cfg) == "too_long"
    assert malformed("cells cells cells cells cells cells die", doc, cfg) == "repeated_text"
    copied = " ".join(doc.text.split()[5:30])
    assert malformed(copied, doc, cfg) == "copied_span"
    assert malformed("Vitamin D deficiency raises the risk of hip fractures in older women.", doc, cfg) is None
    assert longest_copied_run(["a", "b", "c", "x"], ["z", "a", "b", "c"]) == 3


def test_filters_drop_and_count_every_bad_generation(corpus, scifact_dir, tmp_path):
    """Empty, cut, malformed and repeated answers are dropped, each counted under its reason; a query that
    does not lead back to its document in BM25's top k is dropped by the round trip; the counts add up."""
    docs = [d for d in corpus.values() if 4 <= len(d.title.split()) <= 15][:6]
    records = [
        {"doc_id": docs[0].doc_id, "texts": [docs[0].title, ""], "finish_reasons": ["stop", "stop"]},
        {"doc_id": docs[1].doc_id, "texts": [docs[1].title, docs[1].title], "finish_reasons": ["stop", "stop"]},
        {
            "doc_id": docs[2].doc_id,
            "texts": ["Red red red red red red", "Half of a"],
            "finish_reasons": ["stop", "length"],
        },
        {
            "doc_id": docs[3].doc_id,
            "texts": ["Football scores in the premier league this season"],
            "finish_reasons": ["stop"],
        },
        {"doc_id": docs[4].doc_id, "texts": [f"The main finding is that {docs[4].title}"], "finish_reasons": ["stop"]},
    ]
    cfg = _cfg(scifact_dir, tmp_path)
    report = run_filters(records, corpus, cfg, BM25Config())
    summary = report.as_dict()
    assert summary["written"] == 8
    assert summary["dropped"] == {
        "duplicate": 1,
        "empty": 1,
        "repeated_text": 1,
        "round_trip": 1,
        "unfinished": 1,
    }
    assert [c.doc_id for c in report.kept] == [docs[0].doc_id, docs[1].doc_id, docs[4].doc_id]
    assert all(c.rank is not None and c.rank <= 20 for c in report.kept)
    assert report.kept[2].text == docs[4].title[:1].upper() + docs[4].title[1:]
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["written"]
    assert summary["filters"]["well_formed"] == {"in": 8, "kept": 5, "pass_rate": 0.625}
    assert summary["filters"]["round_trip"]["in"] == 4

    # Each filter can be switched off; the model-score filter keeps the top share of a scorer's scores.
    off = cfg.model_copy(update={"filters": cfg.filters.model_copy(update={"dedupe": False, "round_trip_k": 0})})
    assert set(run_filters(records, corpus, off, BM25Config()).passed) == {"well_formed"}
    scored = off.model_copy(update={"filters": off.filters.model_copy(update={"model_score_keep": 0.5})})
    by_score = run_filters(records, corpus, scored, BM25Config(), lambda pairs: [float(len(q)) for q, _ in pairs])
    assert len(by_score.kept) == 2 and by_score.dropped["model_score"] == 3


def test_documents_are_a_seeded_draw_or_the_ones_named(corpus, scifact_dir, tmp_path):
    cfg = _cfg(scifact_dir, tmp_path, documents=50, seed=3)
    first = pick_documents(corpus, cfg)
    assert first == pick_documents(corpus, cfg) and len(first) == 50
    assert first != pick_documents(corpus, cfg.model_copy(update={"seed": 4}))
    named = cfg.model_copy(update={"doc_ids": [first[1], first[0]]})
    assert pick_documents(corpus, named) == [first[1], first[0]]
    with pytest.raises(DataError, match="no-such-doc"):
        pick_documents(corpus, cfg.model_copy(update={"doc_ids": [first[0], "no-such-doc"]}))


def test_a_config_naming_a_missing_document_fails_before_any_work(scifact_dir, tmp_path):
    out = tmp_path / "synth"
    result = runner.invoke(
        app,
        ["synthesize", "--corpus", str(scifact_dir), "--output", str(out), "synthesis.doc_ids=[4983,not-a-doc]"],
    )
    assert result.exit_code == 2, result.output
    assert "not-a-doc" in result.output and "corpus.jsonl" in result.output
    assert not out.exists()


def test_bad_synthesis_settings_are_named(scifact_dir, tmp_path):
    with pytest.raises(ValueError, match="must contain {text}"):
        _cfg(scifact_dir, tmp_path, prompt={"instruction": "Write a query."})
    with pytest.raises(ValueError, match="only {title} and {text}"):
        _cfg(scifact_dir, tmp_path, prompt={"instruction": "{text} {author}"})
    with pytest.raises(ValueError, match="min_words"):
        _cfg(scifact_dir, tmp_path, filters={"min_words": 9, "max_words": 5})
    result = runner.invoke(
        app, ["synthesize", "--corpus", str(scifact_dir), "--output", str(tmp_path / "o"), "synthesis.topk=3"]
    )
    assert result.exit_code == 2 and "topk" in result.output


def test_the_log_survives_a_cut_line_and_refuses_other_settings(tmp_path):
    settings = {"model": "m", "seed": 0}
    log = GenerationLog(tmp_path, settings)
    log.append([{"doc_id": "a", "texts": ["x"]}, {"doc_id": "b", "texts": ["y"]}])
    with log.path.open("a") as f:
        f.write('{"doc_id": "c", "tex')  # killed mid-write
    again = GenerationLog(tmp_path, settings)
    assert again.done() == {"a", "b"} and log.path.read_text().endswith("\n")
    with pytest.raises(DataError, match="seed"):
        GenerationLog(tmp_path, {"model": "m", "seed": 1})


def test_a_log_from_before_a_new_setting_resumes(tmp_path):
    # A log written before `prompt.sentences` existed: the new key at its default is the same writer.
    sc = SynthesisConfig(corpus="c", output=str(tmp_path))
    now = {**sc.generation_settings(), "model": "m"}
    older = json.loads(json.dumps(now))
    del older["prompt"]["sentences"]
    GenerationLog(tmp_path, older).append([{"doc_id": "a", "texts": ["x"]}])
    assert GenerationLog(tmp_path, now, fill=SynthesisConfig.filled_settings).done() == {"a"}
    with pytest.raises(DataError, match="prompt"):  # a changed value is still refused
        other = {**now, "prompt": {**now["prompt"], "sentences": 2}}
        GenerationLog(tmp_path, other, fill=SynthesisConfig.filled_settings)


def test_the_folder_is_a_beir_dataset_linking_the_corpus(scifact_dir, tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    corpus = load_corpus(scifact_dir)
    doc = next(iter(corpus))
    write_beir_folder(out, scifact_dir, {f"syn-{doc}-0": "A claim."}, {f"syn-{doc}-0": doc}, {"complete": True})
    assert (out / "corpus.jsonl").is_symlink() and not os.path.isabs(os.readlink(out / "corpus.jsonl"))
    synthetic = load_dataset(DataConfig(path=str(out), split="train"))
    assert synthetic.qrels == {f"syn-{doc}-0": {doc: 1}} and len(synthetic.corpus) == len(corpus)
    assert json.loads((out / "synthesis.json").read_text()) == {"complete": True}
    # With the real train split of the corpus folder too (labels where they exist, plus synthesis).
    write_beir_folder(out, scifact_dir, {f"syn-{doc}-0": "A claim."}, {f"syn-{doc}-0": doc}, {}, include_split="train")
    both = load_dataset(DataConfig(path=str(out), split="train"))
    assert len(both.qrels) == 1 + len(load_dataset(DataConfig(path=str(scifact_dir), split="train")).qrels)
    # Synthetic ids may never be ids of the corpus folder's own queries.
    with pytest.raises(DataError, match="id_prefix"):
        write_beir_folder(out, scifact_dir, {"0": "A claim."}, {"0": doc}, {})


def test_train_refuses_a_synthesis_it_would_not_train_on(scifact_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data: {{path: {scifact_dir}}}\nmodel: {{path: {tmp_path}}}\n"
        f"synthesis: {{corpus: {scifact_dir}, output: {tmp_path / 'synth'}}}\n"
    )
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "must be data.path" in result.output, result.output
    assert not (tmp_path / "synth").exists()


def test_a_finished_log_needs_no_engine(corpus, scifact_dir, tiny_model_dir, tmp_path, monkeypatch):
    # Every drawn document is in the log and no filter needs the model: no Ray, no actor, only the filters.
    # (Another test of this worker may have started Ray already: the driver's own calls are what must not run.)
    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished log started Ray or an actor")

    monkeypatch.setattr(synthesis_driver, "start_ray", refuse)
    monkeypatch.setattr(synthesis_driver, "ActorPool", refuse)
    docs = [d for d in corpus if len(corpus[d].title.split()) >= 5][:3]
    out = tmp_path / "synth"
    cfg = load_config(
        None,
        [f"data.path={out}", "data.split=train", f"model.path={tiny_model_dir}"]
        + [f"synthesis.corpus={scifact_dir}", f"synthesis.output={out}", f"synthesis.doc_ids=[{','.join(docs)}]"],
    )
    settings = {**cfg.synthesis.generation_settings(), "model": str(tiny_model_dir)}
    log = GenerationLog(out, settings)
    log.append([{"doc_id": d, "texts": [corpus[d].title, ""], "finish_reasons": ["stop", "stop"]} for d in docs])
    (out / "synthesis.json").write_text(json.dumps({"seconds": {"generation": 270.0}, "documents_per_second": 0.74}))
    report = synthesize(cfg, show_progress=False)
    assert report["actors"] == 0 and report["complete"]
    # The earlier run's writing time is kept: a resume adds to it rather than reporting 0 s.
    assert report["seconds"]["generation"] >= 270.0 and report["documents_per_second"] == 0.74
    assert report["documents"]["written_this_run"] == 0 and report["queries"]["dropped"]["empty"] == 3
    assert set(load_dataset(DataConfig(path=str(out), split="train")).query_ids) == {f"syn-{d}-0" for d in docs}
