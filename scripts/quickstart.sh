#!/usr/bin/env bash
# The main job, from a fresh machine: set up, import SmolLM2 offline, then both ProRank stages on SciFact
# (7 GRPO warmup steps, 40 score steps; about 6 minutes on 2 AVX2 cores) with TensorBoard logs, and the reward
# and dev curves as a picture. Extra arguments go to `prorank train` (e.g. score.steps=100).
# Zero-shot evaluation: .venv/bin/prorank eval --config configs/quickstart.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh cpu
model=models/SmolLM2-135M-Instruct
[ -f "$model/model.safetensors" ] || .venv/bin/prorank convert-gguf --output "$model"
out=runs/quickstart/train
.venv/bin/prorank train --config configs/quickstart.yaml --output-dir "$out" "$@"
.venv/bin/prorank plot "$out" --rewards --output "$out/curves.png" --title "quickstart: dev nDCG@10 by step"
