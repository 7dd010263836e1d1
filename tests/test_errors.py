"""Bad input: rnnfast raises what torch.nn raises (same exception type), on every backend."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfast

from conftest import backend_device

F32 = torch.float32


def _pair(cls_name: str, backend: str, *args, **kwargs):
    ref = getattr(torch.nn, cls_name)(*args, **kwargs)
    ours = getattr(rnnfast, cls_name)(*args, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _same_error(ref, ours, device, *args):
    """Both modules raise, and with the same exception type."""
    ref = ref.to(device)
    ours = ours.to(device)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(Exception) as want:
        ref(*args)
    with pytest.raises(want.type):
        ours(*args)


x3 = torch.randn(4, 2, 5)
LAYER_CASES = {
    # name: (class, ctor kwargs, input, hx)
    "1d-input": ("LSTM", {}, torch.randn(5), None),
    "4d-input": ("GRU", {}, torch.randn(1, 4, 2, 5), None),
    "4d-input-rnn": ("RNN", {}, torch.randn(1, 4, 2, 5), None),
    "feature-size": ("LSTM", {}, torch.randn(4, 2, 6), None),
    "feature-size-gru": ("GRU", {}, torch.randn(4, 2, 6), None),
    "h0-batch": ("GRU", {}, x3, torch.zeros(1, 3, 7)),
    "h0-hidden": ("RNN", {}, x3, torch.zeros(1, 2, 8)),
    "h0-layers": ("GRU", {"num_layers": 2}, x3, torch.zeros(1, 2, 7)),
    "h0-bidir": ("RNN", {"bidirectional": True}, x3, torch.zeros(1, 2, 7)),
    "lstm-c0-batch": ("LSTM", {}, x3, (torch.zeros(1, 2, 7), torch.zeros(1, 3, 7))),
    "lstm-c0-size": ("LSTM", {"proj_size": 3}, x3, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))),
    "lstm-h0-proj-size": ("LSTM", {"proj_size": 3}, x3, (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7))),
    "lstm-no-c0": ("LSTM", {}, x3, (torch.zeros(1, 2, 7),)),
    "lstm-tensor-state": ("LSTM", {}, x3, torch.zeros(1, 2, 7)),
    "unbatched-input-batched-state": ("GRU", {}, torch.randn(4, 5), torch.zeros(1, 2, 7)),
    "unbatched-input-batched-state-lstm": ("LSTM", {}, torch.randn(4, 5), (torch.zeros(1, 2, 7),) * 2),
    "batched-input-unbatched-state": ("RNN", {}, x3, torch.zeros(1, 7)),
    "batched-input-unbatched-state-lstm": ("LSTM", {}, x3, (torch.zeros(1, 7),) * 2),
    "empty-sequence": ("LSTM", {}, torch.randn(0, 2, 5), None),
    "empty-sequence-batch-first": ("GRU", {"batch_first": True}, torch.randn(2, 0, 5), None),
    "double-input": ("LSTM", {}, x3.double(), None),
    "int-input": ("GRU", {}, torch.ones(4, 2, 5, dtype=torch.long), None),
    "half-input": ("RNN", {}, x3.half(), None),
    "h0-dtype": ("GRU", {}, x3, torch.zeros(1, 2, 7, dtype=torch.float64)),
    "packed-feature-size": ("LSTM", {}, pack_sequence([torch.randn(3, 6), torch.randn(2, 6)]), None),
    "packed-h0-batch": ("GRU", {}, pack_sequence([torch.randn(3, 5), torch.randn(2, 5)]), torch.zeros(1, 3, 7)),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_bad_input(backend, name):
    cls, kwargs, x, hx = LAYER_CASES[name]
    ref, ours = _pair(cls, backend, 5, 7, **kwargs)
    _same_error(ref, ours, backend_device(backend), x, hx)


CELL_CASES = {
    "3d-input": ("LSTMCell", torch.randn(1, 2, 5), None),
    "feature-size": ("GRUCell", torch.randn(2, 6), None),
    "batch": ("RNNCell", torch.randn(2, 5), torch.zeros(3, 7)),
    "hidden": ("GRUCell", torch.randn(2, 5), torch.zeros(2, 8)),
    "lstm-c-batch": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7), torch.zeros(3, 7))),
    "lstm-c-hidden": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7), torch.zeros(2, 8))),
    "3d-hidden": ("RNNCell", torch.randn(2, 5), torch.zeros(1, 2, 7)),
    "double-input": ("GRUCell", torch.randn(2, 5).double(), None),
    "int-input": ("LSTMCell", torch.ones(2, 5, dtype=torch.long), None),
    "hidden-dtype": ("RNNCell", torch.randn(2, 5), torch.zeros(2, 7, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(CELL_CASES))
def test_cell_bad_input(backend, name):
    cls, x, hx = CELL_CASES[name]
    ref, ours = _pair(cls, backend, 5, 7)
    _same_error(ref, ours, backend_device(backend), x, hx)


def test_rnn_cell_unknown_nonlinearity_at_forward():
    ref, ours = _pair("RNNCell", "reference", 5, 7, nonlinearity="sigmoid")
    _same_error(ref, ours, "cpu", torch.randn(2, 5), None)


CTOR_CASES = [
    ("RNN", dict(nonlinearity="sigmoid")),
    ("LSTM", dict(dropout=1.5)),
    ("GRU", dict(dropout=-0.1)),
    ("LSTM", dict(dropout=True)),
    ("LSTM", dict(hidden_size=0)),
    ("GRU", dict(hidden_size=-1)),
    ("RNN", dict(input_size=0)),
    ("LSTM", dict(num_layers=0)),
    ("LSTM", dict(proj_size=7)),
    ("LSTM", dict(proj_size=-1)),
    ("GRU", dict(proj_size=3)),  # only LSTM supports projections
    ("GRU", dict(bias=1)),
    ("LSTM", dict(batch_first="yes")),
    ("RNN", dict(input_size=5.0)),
]


@pytest.mark.parametrize("cls,kwargs", CTOR_CASES, ids=[f"{c}-{'-'.join(k)}" for c, k in CTOR_CASES])
def test_bad_constructor(cls, kwargs):
    args = dict(input_size=5, hidden_size=7)
    args.update(kwargs)
    with pytest.raises(Exception) as want:
        getattr(torch.nn, cls)(**args)
    with pytest.raises(want.type):
        getattr(rnnfast, cls)(**args)


def test_unknown_backend_names_it():
    with pytest.raises(ValueError, match="nope"):
        rnnfast.LSTM(3, 4, backend="nope")
    layer = rnnfast.GRUCell(3, 4)
    with pytest.raises(ValueError, match="fast"):
        layer.backend = "fast"
    with pytest.raises(ValueError, match="nope"):
        rnnfast.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4)), backend="nope")


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv(rnnfast.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        rnnfast.LSTM(3, 4)(torch.randn(2, 1, 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_propagate_like_torch(backend, value):
    device = backend_device(backend)
    ref, ours = _pair("LSTM", backend, 5, 7, num_layers=2)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(4, 2, 5, device=device)
    x[1, 0, 2] = value
    want, (wh, wc) = ref(x)
    got, (gh, gc) = ours(x)
    for a, b in ((got, want), (gh, wh), (gc, wc)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)
