#!/usr/bin/env bash
# GPU check of the triton backend (`make gpu-check`), run in the repo root on the GPU machine
# with its system python (no network, no venv): install, the triton/gpu tests, the GPU benchmark.
# Writes bench/results/<date>-<gpu>.{json,md} (+ test logs), copied into $OUT when set.
# Whole run: at most TOTAL_S = 390s = 6.5 minutes (tests capped at TEST_CAP_S, benchmark at what is left).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_TOTAL_S:-390}
TEST_CAP_S=${TEST_CAP_S:-200}
RESULTS=bench/results
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
mkdir -p "$RESULTS"
export RNNFAST_NO_EXT=${RNNFAST_NO_EXT:-1}  # the C++ CPU extension is not needed here
export PYTHONUNBUFFERED=1

echo "== install ($(elapsed)s)"
$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . || { echo "install failed"; exit 1; }
$PY - <<'EOF' || exit 1
import torch, triton, rnnfast
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}; backends: {rnnfast.available_backends()}")
EOF
slug=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stem="$RESULTS/$(date +%F)-$slug"

# `pytest -q -x tests -k "triton or gpu"`, split into groups run in parallel (compilation is
# CPU-bound), with one config per kernel (no autotuning) so each kernel variant compiles once.
echo "== tests: pytest -q -x tests -k 'triton or gpu', 7 groups in parallel, cap ${TEST_CAP_S}s ($(elapsed)s)"
# name | -k expression | paths (tests/test_triton_backend.py is all triton: split in three, as
# float16/bfloat16 at H=130 now compile the larger (256-wide) sequence kernels)
groups=(
    "lstm|triton or gpu|tests/test_lstm.py"
    "gru|triton or gpu|tests/test_gru.py"
    "rnn|triton or gpu|tests/test_rnn.py"
    "backend-lstm|lstm|tests/test_triton_backend.py"
    "backend-gru|gru and not lstm|tests/test_triton_backend.py"
    "backend-rest|not lstm and not gru|tests/test_triton_backend.py"
    "other|triton or gpu|tests --ignore=tests/test_lstm.py --ignore=tests/test_gru.py --ignore=tests/test_rnn.py --ignore=tests/test_triton_backend.py"
)
pids=()
names=()
for g in "${groups[@]}"; do
    IFS='|' read -r name kexpr paths <<< "$g"
    read -r -a paths <<< "$paths"
    RNNFAST_TRITON_AUTOTUNE=0 timeout "$TEST_CAP_S" $PY -m pytest -q -x -p no:cacheprovider -rs \
        -k "$kexpr" "${paths[@]}" > "$stem-pytest-$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
done
test_rc=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    [ $rc -eq 124 ] && echo "  ${names[$i]}: TIMED OUT after ${TEST_CAP_S}s"
    # pytest exit code 5: nothing selected in that group
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && test_rc=1
done
for name in "${names[@]}"; do
    echo "-- $name: $(tail -n 1 "$stem-pytest-$name.log")"
    grep -E "^(FAILED|ERROR)|Error" "$stem-pytest-$name.log" | head -n 20
done
echo "tests done ($(elapsed)s), rc=$test_rc"

# the benchmark may overrun its budget by one config: the outer timeout (budget + 20s) still
# ends the whole run ~15s inside TOTAL_S; python -m bench rewrites its results after every case.
# The peers (FlashRNN, Haste) install from bench/peers/ (`make bench-peers` on a machine with network);
# one that does not install shows in the report with pip's reason.
echo "== bench peers: python -m bench.peers install ($(elapsed)s)"
timeout 100 $PY -m bench.peers install --timeout-s 90 || echo "peer install step failed or timed out"
budget=$(( TOTAL_S - $(elapsed) - 35 ))
[ $budget -gt 240 ] && budget=240
echo "== benchmark: python -m bench --device cuda, budget ${budget}s ($(elapsed)s)"
bench_rc=1
if [ $budget -gt 20 ]; then
    timeout $(( budget + 20 )) $PY -m bench --device cuda --budget-s "$budget" --out "$RESULTS"
    bench_rc=$?
else
    echo "no time left for the benchmark"
fi

if [ -n "${OUT:-}" ]; then
    cp "$stem"* "$OUT"/ 2>/dev/null || true
fi
echo "== gpu-check done in $(elapsed)s: tests rc=$test_rc, benchmark rc=$bench_rc"
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
