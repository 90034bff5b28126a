#!/usr/bin/env bash
# A multi-node Ray cluster on one machine (network namespaces on shaped links); see deploy/sim/cluster.py.
#   deploy/sim/simcluster.sh up [--nodes learner,reward,actor,actor] [--rate 800mbit] [--delay 0.2ms]
#   deploy/sim/simcluster.sh train configs/quickstart.yaml [prorank train options]
#   deploy/sim/simcluster.sh down
#   deploy/sim/simcluster.sh run [up options] -- COMMAND...   (up, COMMAND, then down whatever happens)
# Also: status, link NODE up|down, exec NODE COMMAND... Needs root (CAP_NET_ADMIN) and iproute2.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PRORANK_PYTHON:-.venv/bin/python}
sim() { "$PY" -m deploy.sim "$@"; }

if [ "${1:-}" = run ]; then
  shift
  up_args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do up_args+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  state=/tmp/prksim
  for ((i = 0; i < ${#up_args[@]}; i++)); do
    [ "${up_args[$i]}" = --state ] && state=${up_args[$((i + 1))]}
  done
  trap 'sim down --state "$state"' EXIT INT TERM
  sim up "${up_args[@]}"
  "$@"
  exit $?
fi
exec "$PY" -m deploy.sim "$@"
