"""What a user takes away: the exported model folder, its card, the Python reranker and score fusion."""
