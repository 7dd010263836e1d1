# rnnfast: `make demo` and `make test` set everything up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch to install when the venv has none (the local CPU wheel by default)
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup test demo bench bench-quick bench-sweep bench-peers quickstart gpu-check cuda-check compile-gate fuzz sanitize test-bf16-emulated clean

setup: $(VENV)/.rnnfast-deps
	$(PIP) --no-build-isolation --no-deps -e . > $(VENV)/pip-install.log 2>&1 || (cat $(VENV)/pip-install.log; exit 1)
	$(PY) -c "import rnnfast; print('rnnfast backends here:', rnnfast.available_backends())"

$(VENV)/.rnnfast-deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -r requirements-dev.txt setuptools wheel > $(VENV)/pip-deps.log 2>&1 || (cat $(VENV)/pip-deps.log; exit 1)
	touch $@

test: setup
	$(PY) -m pytest -q tests

# the main demo: a 5-minute char-level LSTM on Tiny Shakespeare, then samples (outputs in runs/charlm-demo/)
demo: setup
	$(PY) examples/charlm.py train --minutes 5 --out runs/charlm-demo

quickstart: setup
	$(PY) examples/quickstart.py

# CPU bench (table, JSON and plots into runs/bench/; ~15 min); `--out bench/results` for a committed run
bench: setup
	$(PY) -m bench

bench-quick: setup
	$(PY) -m bench --quick

# random configurations off the grid (bidirectional, proj_size, packed, odd sizes) against torch.nn, slowest first
bench-sweep: setup
	$(PY) -m bench.sweep

# save FlashRNN and Haste into bench/peers/ (untracked, travels to the GPU machine, where gpu-check installs them)
bench-peers: setup
	$(PY) -m bench.peers download

# Long fuzzing (CI runs a bounded, fixed set): FUZZ_EXAMPLES fresh random layer and cell configurations per
# test (4 tests per backend: layers and cells in float32 and float64) against torch.nn, then FUZZ_CALLS random
# bad operator calls in a subprocess; each prints its count.
FUZZ_EXAMPLES ?= 300
FUZZ_CALLS ?= 5000
fuzz: setup
	RNNFAST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py
	$(PY) tests/fuzz_ops.py $(FUZZ_CALLS) $$(date +%s)

# The C++ extension built with AddressSanitizer and UndefinedBehaviorSanitizer (in build/sanitize, next to
# a copy of the package, leaving the normal build alone), then the whole suite on the cpu backend under it.
# python -P and PYTHONPATH: the package copy before the source tree (which still gives bench/ and examples/);
# libstdc++ preloaded too, or ASan cannot intercept C++ throws (TORCH_CHECK); --capture=sys leaves sanitizer
# reports on stderr (pytest's fd capture loses them).
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
SANITIZE_TESTS ?= tests
sanitize: setup
	rm -rf build/sanitize && mkdir -p build/sanitize  # build/sanitize-tmp keeps the objects: ninja rebuilds what changed
	cp -r rnnfast build/sanitize/rnnfast && rm -f build/sanitize/rnnfast/*.so
	cp -r kernels build/sanitize/rnnfast/kernels
	RNNFAST_EXTRA_CFLAGS="$(SANITIZE_FLAGS)" $(PY) setup.py -q build_ext --build-lib build/sanitize \
		--build-temp build/sanitize-tmp > build/sanitize/build.log 2>&1 || (tail -50 build/sanitize/build.log; exit 1)
	PYTHONPATH=build/sanitize:$(CURDIR) LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 RNNFAST_TEST_BACKENDS=cpu \
		$(PY) -P -m pytest -q -p no:cacheprovider --capture=sys $(SANITIZE_TESTS)

# The bfloat16 fused loop on a CPU without AVX512-BF16 or AMX (this project's CI host): the extension built
# with those instructions emulated (csrc/cpu/bf16_emulation.h: vdpbf16ps and vcvtneps2bf16 by AVX-512F, the
# AMX tiles in plain C++), in build/bf16-emulated next to a copy of the package as for `sanitize`, then the
# tests that run the loop on the cpu backend: on AMX tiles, and test_bf16_below_amx's capped run on
# vdpbf16ps (test_lowp's loop tests run instead of skipping; PYTHONSAFEPATH keeps the source tree's package
# out of their subprocesses too). Needs an AVX-512 CPU; about 5 min to build, 1 to test.
BF16_TESTS ?= tests/test_lowp.py tests/test_cpu_backend.py tests/test_parity.py tests/test_api.py tests/test_torch_inputs.py
test-bf16-emulated: setup
	rm -rf build/bf16-emulated && mkdir -p build/bf16-emulated
	cp -r rnnfast build/bf16-emulated/rnnfast && rm -f build/bf16-emulated/rnnfast/*.so
	cp -r kernels build/bf16-emulated/rnnfast/kernels
	RNNFAST_EXTRA_CFLAGS="-DRNNFAST_EMULATE_BF16 -DRNNFAST_EMULATE_AMX" $(PY) setup.py -q build_ext --build-lib build/bf16-emulated \
		--build-temp build/bf16-emulated-tmp > build/bf16-emulated/build.log 2>&1 || (tail -50 build/bf16-emulated/build.log; exit 1)
	PYTHONSAFEPATH=1 PYTHONPATH=build/bf16-emulated:$(CURDIR) RNNFAST_TEST_BACKENDS=cpu $(PY) -c \
		"from rnnfast import _C; assert _C.product_isa('bfloat16') == 'AMX tdpbf16ps', _C.product_isa('bfloat16')"
	PYTHONSAFEPATH=1 PYTHONPATH=build/bf16-emulated:$(CURDIR) RNNFAST_TEST_BACKENDS=cpu $(PY) -m pytest -q \
		-p no:cacheprovider -n 2 $(BF16_TESTS)

# On a GPU machine (system python with CUDA torch + triton): build, GPU tests, GPU bench,
# results in bench/results/<date>-<gpu>.{json,md} (and $$OUT when set).
gpu-check:
	bash bench/gpu_check.sh

# No GPU needed (also part of `make test`): nvcc compiles csrc/**/*.cu for sm_80/sm_90 (no spills,
# real kernels), g++ checks the CUDA binding against CUDA torch headers, and the cuda backend's
# host loop and cell math run on the CPU against the reference
cuda-check: setup
	$(PY) -m pytest -q tests/test_cuda_compile.py tests/test_cuda_emulated.py

# sm_90 compile gate of every persistent-kernel variant "auto" can pick on an H100/H200, on a machine
# without a GPU: no spills, shared memory within 227 KB, W_hh loaded before the time loop; prints the
# table (CI runs a 3-variant subset in tests/test_triton_compile.py). Slow: 144 variants, cached.
compile-gate: setup
	$(PY) tests/triton_compile_gate.py --full

clean:
	rm -rf build *.egg-info rnnfast/*.so
