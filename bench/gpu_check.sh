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
# ends the whole run ~15s inside TOTAL_S; bench.gpu rewrites its results after every config
budget=$(( TOTAL_S - $(elapsed) - 35 ))
[ $budget -gt 240 ] && budget=240
echo "== benchmark: python -m bench.gpu, budget ${budget}s ($(elapsed)s)"
bench_rc=1
if [ $budget -gt 20 ]; then
    timeout $(( budget + 20 )) $PY -m bench.gpu --budget-s "$budget" --out-dir "$RESULTS"
    bench_rc=$?
else
    echo "no time left for the benchmark"
fi

# ==== cuda backend: begin (self-contained; owned by the cuda backend, issue #11) ====
# Builds rnnfast._cuda (with rnnfast._C, whose operator schemas it implements) with this
# machine's nvcc, runs the gpu-marked cuda tests and a short cuda / triton / cuDNN timing,
# decode included. Writes <date>-<gpu>-cuda-{toolchain.txt,build.log,pytest.log,bench.json}.
# At most ~11 minutes (build 300s, tests 240s, timing 120s); RNNFAST_GPU_CHECK_CUDA=0 skips it.
cuda_check() {
    [ "${RNNFAST_GPU_CHECK_CUDA:-1}" = 0 ] && { echo "cuda backend: skipped (RNNFAST_GPU_CHECK_CUDA=0)"; return 0; }
    local py=${PYTHON:-python3} dir=bench/results t0=$(date +%s)
    local cstem
    cstem="$dir/$(date +%F)-$($py -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")-cuda"
    mkdir -p "$dir"
    # toolchain first: nvcc on PATH, under CUDA_HOME or /usr/local/cuda, or from an nvidia-cuda-nvcc wheel
    local nvcc
    nvcc=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null \
        || $py -c "import glob, nvidia; print(next(iter(sorted(g for p in nvidia.__path__ for g in glob.glob(p + '/cu*/bin/nvcc'))), ''))" 2>/dev/null)
    {
        echo "nvcc: ${nvcc:-not found}"; [ -n "$nvcc" ] && "$nvcc" --version | tail -n 2
        echo "c++: $(command -v c++ || command -v g++ || echo not found)"; (c++ --version || g++ --version) 2>/dev/null | head -n 1
        echo "ninja: $(command -v ninja || $py -c 'import ninja; print(ninja.__file__)' 2>/dev/null || echo not found)"
        $py -c "import torch; print(f'torch {torch.__version__} CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}')"
    } > "$cstem-toolchain.txt" 2>&1
    cat "$cstem-toolchain.txt"
    if [ -z "$nvcc" ] || ! command -v c++ > /dev/null; then
        echo "cuda backend: no nvcc or C++ compiler here, not built (see $cstem-toolchain.txt)"; return 2
    fi
    # the toolkit nvcc belongs to, as nvcc reports it (the nvcc on PATH may be a wrapper script)
    local top
    top=$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    export CUDA_HOME=${CUDA_HOME:-$(readlink -f "${top:-$(dirname "$(readlink -f "$nvcc")")/..}")}
    echo "CUDA_HOME=$CUDA_HOME" >> "$cstem-toolchain.txt"
    local cap
    cap=$($py -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")
    echo "== cuda: build for sm ${cap} ($(( $(date +%s) - t0 ))s)"
    if ! RNNFAST_NO_EXT=0 RNNFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=$(nproc) timeout 300 \
        $py -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$cstem-build.log" 2>&1; then
        echo "cuda backend: build failed"; grep -E "error|Error" "$cstem-build.log" | head -n 30; return 1
    fi
    $py -c "import rnnfast; print('backends:', rnnfast.available_backends())" || return 1
    echo "== cuda: gpu tests ($(( $(date +%s) - t0 ))s)"
    local rc=0
    timeout 240 $py -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_cuda_backend.py tests/test_lstm.py \
        tests/test_gru.py tests/test_rnn.py > "$cstem-pytest.log" 2>&1 || rc=1
    tail -n 1 "$cstem-pytest.log"; grep -E "^(FAILED|ERROR)" "$cstem-pytest.log" | head -n 30
    echo "== cuda: timing ($(( $(date +%s) - t0 ))s)"
    timeout 120 $py - "$cstem-bench.json" <<'PYEOF' || rc=1
import json, sys, torch, rnnfast
from rnnfast.backend import get_backend
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
def ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b) / reps)
    return sorted(times)[2]
providers = ["torch"] + [b for b in ("cuda", "triton") if get_backend(b).unavailable_reason() is None]
def layer(p, dtype, **kw):
    torch.manual_seed(0)
    m = (torch.nn.LSTM(**kw) if p == "torch" else rnnfast.LSTM(backend=p, **kw)).cuda().to(dtype)
    return m
rows = []
# fastrnns default: T100 B64 I512 H512, forward + backward
x = torch.randn(100, 64, 512, device="cuda", requires_grad=True)
for p in providers:
    m = layer(p, torch.float32, input_size=512, hidden_size=512)
    rows.append(dict(case="fwdbwd T100 B64 I512 H512 f32", provider=p, ms=ms(lambda: m(x)[0].sum().backward(), 5)))
# decode: T1 B1, 2-layer LSTM H512, state carried, one call per token
for dtype in (torch.float32, torch.bfloat16):
    for p in providers:
        m = layer(p, dtype, input_size=512, hidden_size=512, num_layers=2)
        tok = torch.randn(1, 1, 512, device="cuda", dtype=dtype)
        st = [None]
        def step():
            out, st[0] = m(tok, st[0])
        with torch.no_grad():
            rows.append(dict(case=f"decode T1 B1 L2 H512 {dtype}".replace("torch.", ""), provider=p, ms=ms(step, 200)))
for r in rows:
    base = next(q["ms"] for q in rows if q["case"] == r["case"] and q["provider"] == "torch")
    r["speedup_vs_torch"] = round(base / r["ms"], 3)
    print(f"{r['case']:<34} {r['provider']:<7} {r['ms']:9.4f} ms  x{r['speedup_vs_torch']}")
json.dump(dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(), rows=rows),
          open(sys.argv[1], "w"), indent=1)
PYEOF
    echo "== cuda: done in $(( $(date +%s) - t0 ))s, rc=$rc"
    return $rc
}
cuda_check; cuda_rc=$?
[ -n "${OUT:-}" ] && cp bench/results/*-cuda-* "$OUT"/ 2>/dev/null
# ==== cuda backend: end ====

if [ -n "${OUT:-}" ]; then
    cp "$stem"* "$OUT"/ 2>/dev/null || true
fi
echo "== gpu-check done in $(elapsed)s: tests rc=$test_rc, benchmark rc=$bench_rc, cuda rc=$cuda_rc"
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $cuda_rc -eq 0 ]
