import pytest

from prorank.corpus.data import DataError, load_dataset, load_hub, load_local
from prorank.eval.metrics import evaluate
from prorank.settings.config import DataConfig
from tests.conftest import write_beir

DOCS = [{"_id": "d1", "title": "T1", "text": "alpha"}, {"_id": "d2", "title": "", "text": "beta"}]
QUERIES = [{"_id": "q1", "text": "what is alpha"}, {"_id": "q2", "text": "beta?"}]


def test_real_scifact(scifact_dir):
    test = load_local(scifact_dir, "test")
    assert len(test.corpus) == 5183 and len(test.queries) == 1109
    assert len(test.qrels) == 300 and sum(len(v) for v in test.qrels.values()) == 339
    train = load_dataset(DataConfig(path=str(scifact_dir), split="train"))
    assert len(train.qrels) == 809 and sum(len(v) for v in train.qrels.values()) == 919
    assert test.fingerprint == train.fingerprint and test.name == "scifact"
    doc = test.corpus[next(iter(test.qrels["1"]))]
    assert doc.title and doc.text


def test_small_folder_roundtrip(tmp_path):
    ds = load_local(write_beir(tmp_path, DOCS, QUERIES, ["q1\td1\t1", "q2\td2\t2", "q2\td1\t0"]), "test")
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d1": 0}}
    assert ds.query_ids == ["q1", "q2"] and ds.corpus["d2"].title == ""


@pytest.mark.parametrize(
    "corpus, queries, qrels, message",
    [
        (DOCS + ['{"_id": "d3", "text": '], QUERIES, None, r"corpus.jsonl:3: malformed JSON"),
        (DOCS + ['["a list"]'], QUERIES, None, r"corpus.jsonl:3: expected a JSON object"),
        (DOCS + [{"title": "x", "text": "y"}], QUERIES, None, r"corpus.jsonl:3: missing '_id'"),
        (
            DOCS + [{"_id": "d1", "text": "again"}],
            QUERIES,
            None,
            r"corpus.jsonl:3: duplicate document id 'd1' \(first at .*corpus.jsonl:1\)",
        ),
        (
            DOCS + [{"_id": "d3", "title": " ", "text": ""}],
            QUERIES,
            None,
            r"corpus.jsonl:3: document 'd3' has an empty title and text",
        ),
        (DOCS + [{"_id": "d3", "text": 5}], QUERIES, None, r"corpus.jsonl:3: field 'text' must be a string"),
        (DOCS, QUERIES + [{"_id": "q3", "text": "  "}], None, r"queries.jsonl:3: query 'q3' has an empty text"),
        (DOCS, QUERIES + [{"_id": "q1", "text": "dup"}], None, r"queries.jsonl:3: duplicate query id 'q1'"),
        (DOCS, QUERIES, ["q1\td1\t1", "q9\td1\t1"], r"test.tsv:3: qrel names unknown query 'q9'"),
        (DOCS, QUERIES, ["q1\td1\t1", "q1\td9\t1"], r"test.tsv:3: qrel names unknown document 'd9'"),
        (DOCS, QUERIES, ["q1\td1\tx"], r"test.tsv:2: score 'x' is not an integer"),
        (DOCS, QUERIES, ["q1\td1"], r"test.tsv:2: expected 3 tab-separated columns, got 2"),
        (DOCS, QUERIES, ["q1\td1\t1", "q1\td1\t2"], r"test.tsv:3: duplicate qrel for query 'q1', document 'd1'"),
        (DOCS, QUERIES, [], r"test.tsv: no qrels"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, corpus, queries, qrels, message):
    root = write_beir(tmp_path / "ds", corpus, queries, ["q1\td1\t1"] if qrels is None else qrels)
    with pytest.raises(DataError, match=message):
        load_local(root, "test", strict=True)
    if "empty title" in message or "unknown" in message:  # as published: kept, with a warning
        load_local(root, "test")
    else:  # truly malformed: an error either way
        with pytest.raises(DataError, match=message):
            load_local(root, "test")


def test_data_as_published_is_kept_and_counted(tmp_path, caplog):
    """An empty document is indexed (never retrieved); a qrel naming a document that is not in the corpus
    counts in evaluation as a relevant document never retrieved, and is not trained on; a qrel naming
    an unknown query is dropped. One warning each, with the counts."""

    docs = DOCS + [{"_id": "d3", "title": "", "text": ""}]
    root = write_beir(tmp_path / "ds", docs, QUERIES, ["q1\td1\t1", "q1\td9\t1", "q2\td2\t1", "q7\td1\t1"])
    with caplog.at_level("WARNING", logger="prorank.corpus.data"):
        ds = load_local(root, "test")
    assert ds.corpus["d3"].text == "" and ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert ds.missing_docs == {"q1": {"d9": 1}} and ds.eval_qrels == {"q1": {"d1": 1, "d9": 1}, "q2": {"d2": 1}}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert (
        "1 document(s) with an empty title and text kept (first at " in warnings[0] and "corpus.jsonl:3" in warnings[0]
    )
    assert "1 qrel(s) name documents not in the corpus" in warnings[1] and "1 name unknown queries" in warnings[1]
    perfect = {"q1": {"d1": 2.0, "d3": 1.0}, "q2": {"d2": 2.0}}
    assert evaluate(ds.qrels, perfect)["R@100"] == 1.0
    assert evaluate(ds.eval_qrels, perfect)["R@100"] == 0.75  # d9 can never be retrieved: recall 1/2 on q1


def test_missing_split_and_files(tmp_path):
    root = write_beir(tmp_path / "ds", DOCS, QUERIES, ["q1\td1\t1"])
    with pytest.raises(DataError, match=r"split 'dev' not found: .*available: \['test'\]"):
        load_local(root, "dev")
    (root / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"missing file .*queries.jsonl"):
        load_local(root, "test")
    with pytest.raises(DataError, match=r"data.path '/nope' is not a folder and no data.hub_id is set"):
        load_dataset(DataConfig(path="/nope", hub_id=None))


def test_trec_layout_qrels(tmp_path):
    root = write_beir(tmp_path / "ds", DOCS, QUERIES, [])
    (root / "qrels" / "test.tsv").write_text("q1\t0\td1\t1\nq2\t0\td2\t1\n")
    assert load_local(root, "test").qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}


class _FakeHub:
    """Stands in for `datasets.load_dataset` (no hub access here): rows as the BeIR repos serve them."""

    def __init__(self, corpus, queries, splits):
        self.tables = {("BeIR/toy", "corpus"): corpus, ("BeIR/toy", "queries"): queries}
        self.splits = splits

    def __call__(self, repo, config=None, split=None):
        if repo == "BeIR/toy-qrels":
            if split not in self.splits:
                raise ValueError(f'Unknown split "{split}". Should be one of {list(self.splits)}.')
            return self.splits[split]
        return self.tables[(repo, config)]


def test_hub_loader_same_objects_and_errors(tmp_path, monkeypatch):
    import datasets  # noqa: PLC0415 datasets: heavy, only for hub datasets

    qrels = [{"query-id": "q1", "corpus-id": "d1", "score": 1}, {"query-id": "q2", "corpus-id": "d2", "score": 1}]
    monkeypatch.setattr(datasets, "load_dataset", _FakeHub(DOCS, QUERIES, {"test": qrels}))
    hub = load_dataset(DataConfig(path=str(tmp_path / "absent"), hub_id="BeIR/toy", split="test"))
    local = load_local(write_beir(tmp_path / "ds", DOCS, QUERIES, ["q1\td1\t1", "q2\td2\t1"]), "test")
    assert (hub.corpus, hub.queries, hub.qrels) == (local.corpus, local.queries, local.qrels)
    assert hub.name == "toy" and hub.source == "hub:BeIR/toy"
    with pytest.raises(DataError, match=r"split 'dev' not found in BeIR/toy-qrels"):
        load_hub("BeIR/toy", "dev")
    bad = qrels + [{"query-id": "q1", "corpus-id": "nope", "score": 1}]
    monkeypatch.setattr(datasets, "load_dataset", _FakeHub(DOCS, QUERIES, {"test": bad}))
    with pytest.raises(DataError, match=r"hub:BeIR/toy-qrels/test row 2: qrel names unknown document 'nope'"):
        load_hub("BeIR/toy", "test", strict=True)
    assert load_hub("BeIR/toy", "test").missing_docs == {"q1": {"nope": 1}}
