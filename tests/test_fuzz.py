"""Property-based fuzzing against torch.nn on every backend: random layer and cell
configurations (every option, sizes and T down to 1, packed lengths, train/eval)
in float32 and float64, each through the full parity check (outputs, states,
every gradient).

CI runs a fixed, bounded set of examples. ``make fuzz`` sets
``RNNFAST_FUZZ_EXAMPLES`` (examples per test) for a long run with fresh random
examples and prints how many each test ran.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import INTERPRETED, backend_device
from parity import CELL_FAMILIES, FAMILIES, Case, check_cell, check_layer

LONG = int(os.environ.get("RNNFAST_FUZZ_EXAMPLES", "0"))
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


@st.composite
def layer_cases(draw):
    family = draw(st.sampled_from(FAMILIES))
    kwargs = {"num_layers": draw(st.integers(1, 3)), "bidirectional": draw(st.booleans()), "bias": draw(st.booleans())}
    H = draw(st.integers(1, 24))
    if family == "LSTM" and H > 1 and draw(st.booleans()):
        kwargs["proj_size"] = draw(st.integers(1, H - 1))
    if family == "RNN":
        kwargs["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if kwargs["num_layers"] > 1:
        kwargs["dropout"] = draw(st.sampled_from([0.0, 0.3]))
    packed = draw(st.sampled_from([None, "sorted", "unsorted"]))
    case = Case("fuzz", kwargs, I=draw(st.integers(1, 20)), H=H, T=draw(st.integers(1, 9)), B=draw(st.integers(1, 5)),
                batch_first=draw(st.booleans()), unbatched=packed is None and draw(st.booleans()),
                with_state=draw(st.booleans()), packed=packed, training=draw(st.booleans()))
    return family, case


@st.composite
def cell_cases(draw):
    family = draw(st.sampled_from(CELL_FAMILIES))
    kwargs = {"bias": draw(st.booleans())}
    if family == "RNNCell":
        kwargs["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    case = Case("fuzz-cell", kwargs, I=draw(st.integers(1, 20)), H=draw(st.integers(1, 24)), B=draw(st.integers(1, 5)),
                unbatched=draw(st.booleans()), with_state=draw(st.booleans()))
    return family, case, draw(st.integers(1, 4))


def _examples(backend: str, ci: int) -> int:
    """Examples per test: ``ci``, or RNNFAST_FUZZ_EXAMPLES; a fifth (long runs: a twentieth) of those
    on a backend run through an interpreter."""
    if backend in INTERPRETED:
        return max(2, LONG // 20 if LONG else ci // 5)
    return LONG or ci


def _fuzz(strategy, check, examples: int, label: str) -> None:
    """Run ``check`` on ``examples`` drawn cases; print the count in long runs."""
    ran = []

    @settings(max_examples=examples, deadline=None, derandomize=not LONG, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(strategy)
    def run(drawn):
        ran.append(drawn)
        check(drawn)

    try:
        run()
    finally:
        if LONG:
            print(f"\nfuzz {label}: {len(ran)} examples")


@DTYPES
def test_fuzz_layers_against_torch(backend, dtype):
    device = backend_device(backend)
    _fuzz(layer_cases(), lambda fc: check_layer(*fc, backend, dtype, device), _examples(backend, 30),
          f"layers {backend} {dtype}")


@DTYPES
def test_fuzz_cells_against_torch(backend, dtype):
    device = backend_device(backend)
    _fuzz(cell_cases(), lambda fcs: check_cell(fcs[0], fcs[1], backend, dtype, device, steps=fcs[2]),
          _examples(backend, 15), f"cells {backend} {dtype}")
