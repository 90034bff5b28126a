"""Reranking of BM25 candidates with a model's relevance score, and IR metrics."""
