#!/usr/bin/env bash
# The main job, from a fresh machine: set up, import SmolLM2 offline, then both ProRank stages on SciFact
# (7 GRPO warmup steps, 40 score steps; about 6 minutes on 2 AVX2 cores) with TensorBoard logs, and the reward
# and dev curves as a picture (curves.png in the run's folder). Extra arguments go to `prorank train` (e.g.
# score.steps=100, or train.output_dir=DIR / --output-dir DIR for another folder than runs/quickstart/train).
# Zero-shot evaluation: .venv/bin/prorank eval --config configs/quickstart.yaml
set -euo pipefail

# The folder the job writes to: the last train.output_dir=DIR, --output-dir DIR or --output-dir=DIR among the
# arguments (as `prorank train` reads them), else the quickstart's own.
output_dir_of() {
  local out=runs/quickstart/train
  while (($#)); do
    case "$1" in
      train.output_dir=*) out="${1#train.output_dir=}" ;;
      --output-dir=*) out="${1#--output-dir=}" ;;
      --output-dir) (($# > 1)) && out="$2" && shift ;;
    esac
    shift
  done
  printf '%s\n' "$out"
}

main() {
  cd "$(dirname "$0")/.."
  bash scripts/install.sh cpu
  local model=models/SmolLM2-135M-Instruct out
  [ -f "$model/model.safetensors" ] || .venv/bin/prorank convert-gguf --output "$model"
  out="$(output_dir_of "$@")"
  .venv/bin/prorank train --config configs/quickstart.yaml --output-dir "$out" "$@"
  .venv/bin/prorank plot "$out" --rewards --output "$out/curves.png" --title "quickstart: dev nDCG@10 by step"
}

# Sourced (tests/unit/test_cli.py reads output_dir_of), it defines the function and runs nothing.
if ! (return 0 2>/dev/null); then
  main "$@"
fi
