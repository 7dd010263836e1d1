"""Elman RNN (tanh, relu) and RNNCell: parity with torch.nn on every backend."""

import pytest
import torch

from conftest import backend_device
import parity
from parity import Case, check_cell, check_layer, gradcheck_layer

CASES = [
    Case("base"),
    Case("relu", dict(nonlinearity="relu")),
    Case("T1-B1", T=1, B=1),
    Case("T63-relu", dict(nonlinearity="relu"), T=63, B=2, quick=False),
    Case("no-state", with_state=False),
    Case("batch-first", batch_first=True),
    Case("unbatched", unbatched=True),
    Case("no-bias", dict(bias=False)),
    Case("layers2-relu", dict(num_layers=2, nonlinearity="relu")),
    Case("bidir", dict(bidirectional=True)),
    Case("dropout-train", dict(num_layers=3, dropout=0.4), training=True),
    Case("packed-sorted", packed="sorted", B=4, T=7),
    Case("packed-unsorted-bidir-relu", dict(bidirectional=True, nonlinearity="relu"), packed="unsorted", B=5, T=6),
    Case("wide", I=64, H=130, T=4, B=9, quick=False),
]
CELL_CASES = parity.CELL_CASES + [Case("cell-relu", dict(nonlinearity="relu"), B=4)]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rnn(backend, case, dtype):
    check_layer("RNN", case, backend, dtype, backend_device(backend))


@pytest.mark.parametrize("case", [c.param() for c in CELL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rnn_cell(backend, case, dtype):
    check_cell("RNNCell", case, backend, dtype, backend_device(backend))


@pytest.mark.slow  # hundreds of forward calls: not under the Triton interpreter
@pytest.mark.parametrize(
    "case",
    [Case("gc-tanh", dict(num_layers=2, bidirectional=True), I=3, H=4, T=3, B=2),
     Case("gc-relu", dict(nonlinearity="relu"), I=3, H=4, T=3, B=2)],
    ids=lambda c: c.id,
)
def test_rnn_gradcheck(backend, case):
    if backend_device(backend) != "cpu":
        pytest.skip("gradcheck in float64 runs on the CPU backends")
    gradcheck_layer("RNN", case, backend)
