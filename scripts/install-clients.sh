#!/usr/bin/env bash
# A small second environment for the reranker clients that need transformers 4.x: `mxbai-rerank` (the
# ProRank authors' package, `MxbaiRerankV2`) fails on its first score under transformers 5. The client
# tests (tests/integration/test_clients.py, bench/clients.py) run it in this venv against exported models. Idempotent, like install.sh.
# Usage: bash scripts/install-clients.sh   (PRORANK_CLIENTS_VENV picks the folder; default .venv-clients)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${PRORANK_CLIENTS_VENV:-.venv-clients}
python=${PYTHON:-python3}
pins=(torch==2.13.0+cpu transformers==4.57.6 mxbai-rerank==0.1.6 accelerate==1.15.0 batched)
stamp="$venv/.installed-$(echo "${pins[*]}" | cat - scripts/install-clients.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# The CPU build of torch from the configured indexes (a local wheel cache, say), else PyTorch's CPU index.
pip install -q "${pins[0]}" 2>/dev/null \
  || pip install -q "${pins[0]}" --extra-index-url https://download.pytorch.org/whl/cpu
pip install -q "${pins[@]:1}"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "prorank: clients environment ready in $venv"
