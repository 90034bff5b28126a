#!/usr/bin/env bash
# The main job, from a fresh machine: set up, import SmolLM2 offline, evaluate it on SciFact.
# Extra arguments go to `prorank eval` (e.g. eval.max_queries=300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh cpu
model=models/SmolLM2-135M-Instruct
[ -f "$model/model.safetensors" ] || .venv/bin/prorank convert-gguf --output "$model"
exec .venv/bin/prorank eval --config configs/quickstart.yaml "$@"
