"""Parity with torch.nn on every backend: LSTM, GRU and RNN layers and cells, each
case of their grids (parity.LAYER_CASES) in float32 and float64: outputs, final
states and every gradient; float64 gradcheck on the CPU backends."""

import pytest
import torch

import rnnfast
from conftest import POISON, backend_device
from parity import CELL_FAMILIES, FAMILIES, GRADCHECK_CASES, LAYER_CASES, cell_cases, check_cell, check_layer, \
    gradcheck_layer

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _grid(cases_of, families):
    """pytest params (family, case) with ids ``<family>-<case>``; slow cases marked."""
    return [pytest.param(f, c, id=f"{f}-{c.id}", marks=c.param().marks) for f in families for c in cases_of(f)]


@DTYPES
@pytest.mark.parametrize("family, case", _grid(LAYER_CASES.get, FAMILIES))
def test_layer(backend, family, case, dtype):
    check_layer(family, case, backend, dtype, backend_device(backend))


@DTYPES
@pytest.mark.parametrize("family, case", _grid(cell_cases, CELL_FAMILIES))
def test_cell(backend, family, case, dtype):
    check_cell(family, case, backend, dtype, backend_device(backend))


@pytest.mark.slow  # hundreds of forward calls: not under the Triton interpreter
@pytest.mark.parametrize("family, case", _grid(GRADCHECK_CASES.get, FAMILIES))
def test_gradcheck(backend, family, case):
    if backend_device(backend) != "cpu":
        pytest.skip("gradcheck in float64 runs on the CPU backends")
    gradcheck_layer(family, case, backend)


def test_allocations_are_poisoned():
    """The premise that makes an unwritten output fail parity: fresh memory reads as NaN
    (integers -1), from Python's allocators and from C++ ``at::empty`` alike (conftest)."""
    if not POISON:
        pytest.skip("RNNFAST_POISON=0 turned poisoning off")
    assert torch.empty(5).isnan().all()
    assert torch.empty_like(torch.zeros(2, 3, dtype=torch.float64)).isnan().all()
    assert torch.zeros(1).new_empty(4).isnan().all()
    assert torch.empty_strided((2, 2), (1, 2)).isnan().all()
    assert (torch.empty(3, dtype=torch.int64) == -1).all()
    if "cpu" in rnnfast.available_backends():  # the extension poisons the CPU allocator itself
        assert torch.ops.aten.empty.memory_format([6]).isnan().all()
        assert (torch.ops.aten.empty.memory_format([6], dtype=torch.int32) == -1).all()
