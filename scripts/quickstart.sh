#!/usr/bin/env bash
# The main job, from a fresh machine: set up, import SmolLM2 offline, then a few minutes of stage-1
# training (GRPO) on SciFact with TensorBoard logs. Extra arguments go to `prorank train`
# (e.g. train.steps=40). Zero-shot evaluation: .venv/bin/prorank eval --config configs/quickstart.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh cpu
model=models/SmolLM2-135M-Instruct
[ -f "$model/model.safetensors" ] || .venv/bin/prorank convert-gguf --output "$model"
exec .venv/bin/prorank train --config configs/quickstart.yaml "$@"
