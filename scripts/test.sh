#!/usr/bin/env bash
# The test command: sets up the environment if needed, checks lint, format and types, then runs the whole
# suite: two pytest workers over every module but the serial ones, longest modules first (tests/conftest.py),
# then the serial ones alone, with the beside_serial ones at nice 19 on the core they leave idle, and prints the
# tests' wall time and user CPU. Two workers keep both cores busy; a third added only CPU (each job's Ray,
# engines and ranks tick while they wait for a core: BENCHMARKS.md, "two workers").
# With a selection of your own (-m, -k, a path), one pytest runs just that: bash scripts/test.sh tests/unit
# is the fast tier (about a minute). PRORANK_TEST_WORKERS sets the number of workers (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
# Two busy processes share 2 cores: OpenMP threads that spin at their barriers would hold a core the other
# needs; a local Ray's GCS can take longer than Ray's default 30 s to come up beside a running job.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} RAY_gcs_server_port_wait_time_s=${RAY_gcs_server_port_wait_time_s:-120}
pytest=(.venv/bin/python -m pytest)
if [ -z "${PRORANK_TIMED:-}" ]; then
  bash scripts/install.sh cpu
  bash scripts/install-clients.sh  # mxbai-rerank under transformers 4, for tests/integration/test_clients.py
  # Lint, import order, format and types first (pyproject's [tool.ruff] and [tool.mypy]): seconds, and a
  # finding stops the run before any test starts. PRORANK_SKIP_CHECKS=1 skips them (a quick local selection).
  if [ -z "${PRORANK_SKIP_CHECKS:-}" ]; then
    .venv/bin/ruff check --no-cache .
    .venv/bin/ruff format --check --no-cache .
    .venv/bin/mypy
  fi
  for arg in "$@"; do
    case "$arg" in -m|-k|tests*|*.py*) exec "${pytest[@]}" "$@" ;; esac
  done
  # The whole suite runs under scripts/timed.py, which prints its wall time and user CPU, counting every
  # process the tests started: it runs this script again, with PRORANK_TIMED set, to do so.
  PRORANK_TIMED=1 exec .venv/bin/python scripts/timed.py tests bash "$0" "$@"
fi
status=0
# One folder the suite's pytest processes share, for what is made once a run (the converted SmolLM2: tests/conftest.py).
PRORANK_TEST_SHARED=$(mktemp -d -t prorank-tests.XXXXXX)
export PRORANK_TEST_SHARED
trap 'rm -rf "$PRORANK_TEST_SHARED"' EXIT
"${pytest[@]}" -n "${PRORANK_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder -m "not serial and not beside_serial" "$@" || status=$?
# The serial modules mostly wait, leaving a core idle: the beside_serial ones use it at nice 19 (tests/conftest.py).
# Their report follows the serial one's.
beside_log=$(mktemp)
nice -n 19 "${pytest[@]}" -m beside_serial "$@" >"$beside_log" 2>&1 &
beside=$!
"${pytest[@]}" -m serial "$@" || { s=$?; [ "$status" != 0 ] || status=$s; }
wait "$beside" || { s=$?; [ "$status" != 0 ] || status=$s; }
cat "$beside_log"
rm -f "$beside_log"
exit "$status"
