#!/usr/bin/env bash
# GPU check of the triton and cuda backends (`make gpu-check`), run in the repo root on the GPU machine with its
# system python (no network, no venv). At most ~8 minutes; every phase under its own `timeout`, most
# important first:
#   1. correctness (200s): tests/test_triton_gpu_grid.py, every kernel "auto" can pick (LSTM/GRU x bf16 /
#      fp32 TF32 off / TF32 on x H 128,130,256,1024 x B 1,3,16,256 x T 1,7,100; plain, bidirectional,
#      packed) vs float64 torch.nn, poisoned memory, each case run twice and bit-identical; in parallel
#      the triton/gpu tests of the suite (tests -k "triton or gpu"), and the cuda backend's build and gpu
#      tests (bench/gpu_check_cuda.sh).
#   2. speed (<=170s): the bench harness's GPU grid against cuDNN.
#   3. barrier (40s): python -m rnnfast.kernels.barrier, us per step for 8-132 programs.
# Writes bench/results/<date>-<gpu>-gpu-check.{json,md} (phases with exit codes and times, the grid's
# per-case errors, the barrier table) even when a phase fails or times out, next to the bench's own
# <date>-<gpu>.{json,md} and the logs; everything is copied into $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
RESULTS=bench/results
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
mkdir -p "$RESULTS"
export RNNFAST_NO_EXT=${RNNFAST_NO_EXT:-1}  # the C++ CPU extension is not needed here
export PYTHONUNBUFFERED=1
export RNNFAST_TRITON_AUTOTUNE=0  # one config per step/sequence kernel: each variant compiles once
slug=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))" \
       2>/dev/null || echo unknown-gpu)
stem="$RESULTS/$(date +%F)-$slug"
phases="$stem-phases.tsv"
: > "$phases"
grid_out="$stem-grid.jsonl"
: > "$grid_out"

# phase NAME SECONDS CMD...: run CMD under `timeout`, log to $stem-NAME.log, record rc and time
phase() {
    local name=$1 secs=$2; shift 2
    local t0; t0=$(date +%s)
    echo "== $name (timeout ${secs}s, at $(elapsed)s)"
    timeout "$secs" "$@" > "$stem-$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$secs" >> "$phases"
    tail -n 3 "$stem-$name.log"
    [ $rc -eq 124 ] && echo "   $name: TIMED OUT after ${secs}s"
    return $rc
}

summary() {
    $PY - "$stem" "$phases" "$grid_out" <<'EOF'
import json, sys, time
stem, phases, grid = sys.argv[1:4]
rows = [l.rstrip("\n").split("\t") for l in open(phases) if l.strip()]
res = {"date": time.strftime("%F %T"), "phases": [
    {"name": n, "rc": int(rc), "timed_out": rc in ("124", "137"), "seconds": int(s), "limit_s": int(lim),
     "log": f"{stem}-{n}.log"} for n, rc, s, lim in rows]}
try:
    import torch, triton
    res["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__}
except Exception as e:  # noqa: BLE001 - the summary is written whatever failed
    res["env"] = {"error": repr(e)}
cases = [json.loads(l) for l in open(grid) if l.strip()]
res["grid"] = {"cases_run": len(cases), "cases_total": 288, "passed": sum(c["ok"] for c in cases),
               "not_identical": [c["case"] for c in cases if not c["identical"]],
               "failed": [c["case"] for c in cases if not c["ok"]], "cases": cases}
try:
    res["barrier"] = json.load(open(f"{stem}-barrier.json"))["barrier"]
except Exception:  # noqa: BLE001
    res["barrier"] = None
json.dump(res, open(f"{stem}-gpu-check.json", "w"), indent=1)
md = [f"# gpu-check {res['date']}: {res['env']}", "", "| phase | rc | seconds | limit | timed out |", "|---|---|---|---|---|"]
md += [f"| {p['name']} | {p['rc']} | {p['seconds']} | {p['limit_s']} | {p['timed_out']} |" for p in res["phases"]]
g = res["grid"]
md += ["", f"correctness grid: {g['cases_run']} of {g['cases_total']} cases run, {g['passed']} passed; "
       f"failed: {', '.join(g['failed']) or 'none'}; runs not bit-identical: {', '.join(g['not_identical']) or 'none'}"]
if res["barrier"]:
    md += ["", "| programs | us per step |", "|---|---|"] + [f"| {b['programs']} | {b['us_per_step']} |"
                                                           for b in res["barrier"]]
open(f"{stem}-gpu-check.md", "w").write("\n".join(md) + "\n")
print("\n".join(md[:3 + len(res["phases"]) + 2]))
EOF
    if [ -n "${OUT:-}" ]; then
        cp "$stem"* "$OUT"/ 2>/dev/null || true
    fi
}
trap summary EXIT

# ---- 0. install --------------------------------------------------------------------------------
phase install 45 bash -c "$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . && $PY -c \
    'import torch, triton, rnnfast; print(torch.__version__, torch.version.cuda, triton.__version__, \
    torch.cuda.get_device_name(), rnnfast.available_backends())'" || exit 1

# ---- 1. correctness: the auto kernels' grid (8 shards) and the suite's triton/gpu tests, in parallel
# (compilation is CPU-bound); one phase record per process
echo "== correctness: grid in 8 shards + triton/gpu tests, 200s ($(elapsed)s)"
pids=()
for i in 0 1 2 3 4 5 6 7; do
    RNNFAST_GPU_SHARD="$i/8" RNNFAST_GPU_GRID_OUT="$grid_out" \
        phase "grid$i" 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_triton_gpu_grid.py &
    pids+=($!)
done
phase tests-triton 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_triton_backend.py \
    tests/test_triton_persistent.py &
pids+=($!)
# the peers (FlashRNN, Haste) install from bench/peers/ (`make bench-peers` beforehand, on a machine with
# network); one that does not install shows in the speed report with pip's reason
phase peers 200 $PY -m bench.peers install --timeout-s 190 &
pids+=($!)
# the cuda backend (bench/gpu_check_cuda.sh): toolchain, build for this GPU, its gpu tests; its speed
# comes from the harness's `cuda` provider in phase 2
phase cuda 200 bash bench/gpu_check_cuda.sh &
pids+=($!)
phase tests-families 200 $PY -m pytest -q -p no:cacheprovider -rs -k "triton or gpu" tests/test_parity.py &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done

# ---- 2. speed: the bench harness's GPU grid (python -m bench --device cuda) against cuDNN and the peers
# that installed, cells ordered so a cut-off drops the least important; results in
# bench/results/<date>-<gpu>.{json,md} and plots
budget=$(( 480 - 40 - 20 - $(elapsed) ))
[ $budget -gt 170 ] && budget=170
if [ $budget -gt 30 ]; then
    phase speed $(( budget + 15 )) $PY -m bench --device cuda --grid gpu --budget-s "$budget" --out "$RESULTS"
else
    echo "no time left for the speed grid"
fi

# ---- 3. the persistent kernels' per-step barrier ------------------------------------------------------
phase barrier 40 $PY -m rnnfast.kernels.barrier --out "$stem-barrier.json"
echo "== gpu-check done in $(elapsed)s"
# failed: any phase with a non-zero exit
[ "$(awk -F'\t' '$2 != 0' "$phases" | wc -l)" -eq 0 ]
