"""The gRPC reward service: scores grouped judgments against qrels."""
