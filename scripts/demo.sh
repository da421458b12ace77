#!/usr/bin/env bash
# `make demo`: build the guest image if it is missing, boot a master and one worker with the
# no-TEE default, run the MiniLM benchmark across them, print the table and the chart's path,
# and tear the cluster down whatever happened. The sizes are small because under TCG (no usable
# KVM) a guest runs torch at about 0.1-0.3 GFLOP/s; on KVM hosts pass bigger ones to gcvm run bench.
set -uo pipefail
cd "$(dirname "$0")/.."
GCVM=${GCVM:-.venv/bin/gcvm}
NAME=${GCVM_DEMO_NAME:-demo}
OUT=${GCVM_DEMO_OUT:-results}
start=$(date +%s)

finish() {
  rc=$?
  trap - EXIT INT TERM
  "$GCVM" down --name "$NAME" || rc=1
  echo "demo: exit status $rc, wall time $(( $(date +%s) - start )) s" >&2
  exit "$rc"
}

"$GCVM" image build || exit $?
trap finish EXIT
trap 'exit 130' INT TERM
"$GCVM" up --tee none --workers 1 --name "$NAME" || exit $?
"$GCVM" run bench --name "$NAME" --model minilm \
  --modes tee-only,plain-offload,mask-only,groupcover,hardened --batch 2 --seq 16 --repeat 3 \
  --out "$OUT"
