"""Benchmarks: run as modules from the repo root, e.g. `python -m bench.reward` (a plain script path would let bench/reward.py shadow the reward package)."""
