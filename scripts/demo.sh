#!/usr/bin/env bash
# `make demo`: build the guest image if it is missing, boot one master VM with the no-TEE default,
# locked as a TEE cluster's masters are (no SSH; the framework from its dm-verity code disk; runs
# through its job agent), and the host worker (the seed's deployment), write a stand-in secret (MiniLM perturbed from
# the OS CSPRNG: no copy of it exists) into the owner folder, protect it on the host into model
# packages (keys in the owner folder), copy them into the master, release the keys through the run's
# broker (without attestation: --tee none, and every result says so), run the benchmark from
# the packages, print the tables and the chart's path, and tear the cluster down whatever
# happened. The sizes are small because under TCG (no usable KVM) a guest runs torch at about
# 0.1-0.3 GFLOP/s; on KVM hosts pass bigger ones to gcvm run bench.
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
"$GCVM" up --tee none --locked --masters 1 --worker host --name "$NAME" || exit $?
"$GCVM" run bench --name "$NAME" --model minilm-standin \
  --modes tee-only,plain-offload,groupcover-nomask,mask-only,groupcover,hardened --batch 2 --seq 16 \
  --repeat 3 \
  --out "$OUT"
