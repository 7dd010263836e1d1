# rnnfast: `make demo` and `make test` set everything up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch to install when the venv has none (the local CPU wheel by default)
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup test demo bench bench-quick bench-peers quickstart gpu-check cuda-check compile-gate clean

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

# save FlashRNN and Haste into bench/peers/ (untracked, travels to the GPU machine, where gpu-check installs them)
bench-peers: setup
	$(PY) -m bench.peers download

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
