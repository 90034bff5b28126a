"""ProRank RL shared core: config, data, first-stage retrieval, prompt and score, models.

`from prorank import Reranker` is the Python API to a trained model (loaded lazily, so that importing
the core stays light)."""


def __getattr__(name: str):
    if name in ("Reranker", "RankedDocument"):
        from prorank import reranker

        return getattr(reranker, name)
    raise AttributeError(f"module 'prorank' has no attribute {name!r}")
