"""LSTM and LSTMCell: parity with torch.nn on every backend (outputs, states, gradients)."""

import pytest
import torch

from conftest import backend_device
from parity import CELL_CASES, Case, check_cell, check_layer, gradcheck_layer

CASES = [
    Case("base"),
    Case("T1-B1", T=1, B=1),
    Case("T63", T=63, B=2, quick=False),
    Case("no-state", with_state=False),
    Case("batch-first", batch_first=True),
    Case("unbatched", unbatched=True),
    Case("unbatched-no-state", unbatched=True, with_state=False, batch_first=True),
    Case("no-bias", dict(bias=False)),
    Case("layers2", dict(num_layers=2)),
    Case("bidir", dict(bidirectional=True)),
    Case("layers3-bidir", dict(num_layers=3, bidirectional=True), quick=False),
    Case("proj", dict(proj_size=11)),
    Case("proj-bidir-layers2", dict(proj_size=5, num_layers=2, bidirectional=True)),
    Case("dropout-train", dict(num_layers=3, dropout=0.4), training=True),
    Case("dropout-eval", dict(num_layers=2, dropout=0.4), training=False, quick=False),
    Case("packed-sorted", packed="sorted", B=4, T=7),
    Case("packed-unsorted", packed="unsorted", B=5, T=6),
    Case("packed-bidir-layers2", dict(bidirectional=True, num_layers=2), packed="unsorted", B=4, T=6),
    Case("packed-proj-dropout", dict(proj_size=7, num_layers=2, dropout=0.3), packed="unsorted", training=True,
         quick=False),
    Case("packed-batch-first-no-state", packed="unsorted", batch_first=True, with_state=False),
    Case("wide", I=64, H=130, T=4, B=9, quick=False),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm(backend, case, dtype):
    check_layer("LSTM", case, backend, dtype, backend_device(backend))


@pytest.mark.parametrize("case", [c.param() for c in CELL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_lstm_cell(backend, case, dtype):
    check_cell("LSTMCell", case, backend, dtype, backend_device(backend))


@pytest.mark.slow  # hundreds of forward calls: not under the Triton interpreter
@pytest.mark.parametrize(
    "case",
    [Case("gc", dict(num_layers=2, bidirectional=True), I=3, H=4, T=3, B=2),
     Case("gc-proj", dict(proj_size=2), I=3, H=4, T=3, B=2)],
    ids=lambda c: c.id,
)
def test_lstm_gradcheck(backend, case):
    if backend_device(backend) != "cpu":
        pytest.skip("gradcheck in float64 runs on the CPU backends")
    gradcheck_layer("LSTM", case, backend)
