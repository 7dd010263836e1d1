"""Parity with torch.nn on every backend: LSTM, GRU and RNN layers and cells, each
case of their grids (parity.LAYER_CASES) in float32 and float64: outputs, final
states and every gradient; float64 gradcheck on the CPU backends."""

import pytest
import torch

import rnnfast
from conftest import POISON, backend_device
from parity import CELL_FAMILIES, FAMILIES, GRADCHECK_CASES, LAYER_CASES, RNNSpec, cell_cases, check_cell, \
    check_layer, gradcheck_layer, make_inputs, mode_of, require_support, run_layer, twins

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


@pytest.mark.parametrize("family, case", _grid(LAYER_CASES.get, FAMILIES))
def test_plain_call_shortcut_matches_the_full_path(backend, family, case, monkeypatch):
    """The layers' shortcut for plain CPU tensor calls gives the full path's outputs and gradients bit
    for bit, and takes every call but packed, unbatched and projected ones."""
    if backend not in ("cpu", "reference"):
        pytest.skip("the shortcut is the same Python before every backend: checked on cpu and reference")
    spec_kwargs = {k: v for k, v in case.kwargs.items() if k != "nonlinearity"}
    require_support(backend, RNNSpec(mode_of(family, case.kwargs), case.I, case.H, training=case.training,
                                     **spec_kwargs), torch.float32, "cpu", case.packed is not None)
    _, layer = twins(family, backend, case.I, case.H, batch_first=case.batch_first, **case.kwargs)
    layer.train(case.training)
    D = 2 if case.kwargs.get("bidirectional") else 1
    sizes = [case.kwargs.get("proj_size") or case.H] + ([case.H] if family == "LSTM" else [])
    inputs = make_inputs(case, sizes, case.kwargs.get("num_layers", 1) * D)
    cls, shortcut, taken = type(layer), type(layer)._plain_call, []
    monkeypatch.setattr(cls, "_plain_call", lambda self, *a: taken.append(shortcut(self, *a)) or taken[-1])
    got, got_g = run_layer(layer, case, inputs, torch.float32, "cpu")
    assert [t is not None for t in taken] == [not (case.packed or case.unbatched or case.kwargs.get("proj_size"))]
    monkeypatch.setattr(cls, "_plain_call", lambda self, *a: None)
    layer.zero_grad(set_to_none=True)
    want, want_g = run_layer(layer, case, inputs, torch.float32, "cpu")
    for a, b in zip(got + list(got_g.values()), want + list(want_g.values())):
        assert a.shape == b.shape and torch.equal(a, b)


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
