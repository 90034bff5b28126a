"""Data and the first stage: BEIR datasets, BM25, training batches, and the queries written for a bare corpus."""
