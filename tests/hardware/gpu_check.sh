#!/usr/bin/env bash
# The GPU checks in one run (< 5 minutes on a machine with a CUDA GPU):
#   1. tests/hardware (CUDA worker: Linear, Conv1d, Conv2d and BERT-base within the CPU path's
#      exactness bound, TF32 off);
#   2. `python -m groupcover.measure.precision`: the masked modes' worker products (MiniLM's
#      layers at batch 8 x 128) in float32 and float64, interleaved, on the CPU and on cuda, with
#      the float64 / float32 ratio, and the error a float32 worker makes of a masked product
#      (runs without CUDA too, CPU rows only);
#   3. `python -m groupcover bench --local` for BERT-base (random weights) at batch 8 x 128 with
#      a one-thread master and the worker on cuda, then the speed-up and error targets.
# Run from the checkout's root, as it is: Python 3.12 with its own CUDA torch, no network, the
# project installed with `pip install --no-deps -e .`. Random-weight models only (no download).
# Without CUDA it runs up to where CUDA is needed and prints SKIP lines (exit 0), so the flow is
# tested on CPU machines too. Env: PYTHON (default python3), OUT (default $OUT or ./gpu-check),
# REPEAT (default 5), GPU_CHECK_WHEELS (a folder of wheels for missing pure dependencies).
set -u -o pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$PWD/gpu-check}
REPEAT=${REPEAT:-5}
mkdir -p "$OUT_DIR"
status=0
say() { printf 'gpu_check: %s\n' "$*"; }

say "python $($PY -c 'import sys; print(sys.version.split()[0])'), torch $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
missing=$($PY - <<'PYEOF'
import importlib.util
need = ["torch", "numpy", "cryptography", "safetensors", "pytest", "groupcover"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PYEOF
)
if [ -n "$missing" ] && [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    say "installing $missing from $GPU_CHECK_WHEELS (no index)"
    # shellcheck disable=SC2086
    $PY -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" $missing || status=1
    missing=$($PY -c "import importlib.util as u; print(' '.join(n for n in '$missing'.split() if u.find_spec(n) is None))")
fi
if [ -n "$missing" ]; then
    say "FAIL missing Python modules: $missing (install the project with pip install --no-deps -e ., and carry wheels for the rest: GPU_CHECK_WHEELS=DIR)"
    exit 1
fi
if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    CUDA=1
    say "CUDA device: $($PY -c 'import torch; print(torch.cuda.get_device_name(0))')"
else
    CUDA=0
    say "no CUDA device here (torch.cuda.is_available() is False)"
fi

say "1/3 hardware tests"
$PY -m pytest -q -p no:cacheprovider -rs tests/hardware/test_gpu_exact.py \
    tests/hardware/test_gpu_worker.py 2>&1 | tee "$OUT_DIR/hardware-tests.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; fi
if [ "$CUDA" = 0 ]; then
    grep -q "SKIPPED" "$OUT_DIR/hardware-tests.txt" || { say "FAIL the hardware tests did not skip without CUDA"; status=1; }
fi

say "2/3 the worker's precision: float32 vs float64 products on the masked modes' layers"
timeout 180 $PY -m groupcover.measure.precision --batch 8 --seq 128 --repeat "$REPEAT" \
    --json "$OUT_DIR/precision.json" 2>&1 | tee "$OUT_DIR/precision.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then say "FAIL measure.precision exited $rc"; status=1; fi
if [ "$CUDA" = 1 ]; then
    grep -q "^cuda per MiniLM forward" "$OUT_DIR/precision.txt" || { say "FAIL measure.precision reported no cuda rows"; status=1; }
fi

say "3/3 bench --local: bert-base batch 8 x 128, one-thread master, worker on cuda"
if [ "$CUDA" = 0 ]; then
    say "SKIP bench --local on cuda: no CUDA device (the worker would run on the CPU)"
    say "done, status $status"
    exit "$status"
fi
timeout 240 $PY -m groupcover bench --local --model bert-base --batch 8 --seq 128 \
    --threads 1 --repeat "$REPEAT" --warmup 1 --timeout 120 \
    --modes tee-only,plain-offload,groupcover-nomask,mask-only,groupcover \
    --json "$OUT_DIR/bert-base-cuda.json" 2>&1 | tee "$OUT_DIR/bench.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    say "FAIL bench --local exited $rc"
    status=1
else
    grep -q "(cuda" "$OUT_DIR/bench.txt" || say "WARNING the master did not report a cuda worker"
    $PY -m tests.hardware.gpu_ratios "$OUT_DIR/bert-base-cuda.json" | tee "$OUT_DIR/ratios.txt" || status=1
fi
say "done, status $status"
exit "$status"
