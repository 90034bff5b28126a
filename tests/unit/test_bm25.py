from prorank.corpus.bm25 import bm25_search, cache_root
from prorank.eval.metrics import evaluate, ranked_to_run
from prorank.settings.config import BM25Config


def _ndcg(dataset, ranking):
    return evaluate(dataset.qrels, ranked_to_run({q: [d for d, _ in h] for q, h in ranking.items()}))


def test_scifact_bm25_in_published_range(scifact_test, tmp_path):
    cfg = BM25Config(cache_dir=str(tmp_path))
    ranking = bm25_search(scifact_test, scifact_test.query_ids, cfg)
    assert all(len(hits) == 100 for hits in ranking.values())
    assert all(a[1] >= b[1] for hits in ranking.values() for a, b in zip(hits, hits[1:]))
    metrics = _ndcg(scifact_test, ranking)
    assert 0.66 <= metrics["nDCG@10"] <= 0.70, metrics
    assert metrics["R@100"] > 0.9


def test_cache_is_keyed_by_parameters(scifact_test, tmp_path):
    cfg = BM25Config(cache_dir=str(tmp_path), top_k=10)
    qids = scifact_test.query_ids[:5]
    first = bm25_search(scifact_test, qids, cfg)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2  # one index folder, one run file
    assert bm25_search(scifact_test, qids, cfg) == first  # read back from the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    other = bm25_search(scifact_test, qids, cfg.model_copy(update={"k1": 0.9}))
    assert len(list(tmp_path.iterdir())) == 4
    assert other != first  # different k1, different scores


def test_default_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRORANK_CACHE", str(tmp_path))
    assert cache_root(BM25Config()) == tmp_path / "bm25"
