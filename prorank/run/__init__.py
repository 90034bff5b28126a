"""A run's files: checkpoints, its lock, metrics, plots and progress lines, rollouts, the weight transport's ends."""
