#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh cpu
bash scripts/install-clients.sh  # mxbai-rerank under transformers 4, for tests/test_clients.py
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
