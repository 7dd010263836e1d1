#!/usr/bin/env bash
# The cuda backend part of `make gpu-check` (issue #11), run by bench/gpu_check.sh beside the triton
# correctness phase: find the toolchain, build rnnfast._cuda for this GPU, run the gpu-marked cuda tests.
# Its speed (fastrnns default, decode) comes from the bench harness's `cuda` provider in the speed phase.
set -uo pipefail
cd "$(dirname "$0")/.."
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
    if ! RNNFAST_NO_EXT=0 RNNFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=$(nproc) timeout 120 \
        $py -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$cstem-build.log" 2>&1; then
        echo "cuda backend: build failed"; grep -E "error|Error" "$cstem-build.log" | head -n 30; return 1
    fi
    $py -c "import rnnfast; print('backends:', rnnfast.available_backends())" || return 1
    echo "== cuda: gpu tests ($(( $(date +%s) - t0 ))s)"
    local rc=0
    timeout 75 $py -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_cuda_backend.py tests/test_parity.py > "$cstem-pytest.log" 2>&1 || rc=1
    tail -n 1 "$cstem-pytest.log"; grep -E "^(FAILED|ERROR)" "$cstem-pytest.log" | head -n 30
    echo "== cuda: done in $(( $(date +%s) - t0 ))s, rc=$rc"
    return $rc
}
cuda_check
