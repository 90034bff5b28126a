"""ProRank RL shared core: config, data, first-stage retrieval, prompt and score, models."""
