"""Bad input: rnnfast raises what torch.nn raises, the exception type each case
names and torch.nn's message (or, where torch's is an accident of its internals
such as a failed matmul, rnnfast's own clearer one), on every backend."""

import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import rnnfast

from conftest import backend_device
from parity import flat, twins


def _same_error(name, backend, error, match, *args, **kwargs):
    """torch.nn.<name> and its rnnfast twin both raise ``error``; rnnfast's message is torch's,
    or matches ``match`` where given."""
    device = backend_device(backend)
    ref, ours = twins(name, backend, 5, 7, device=device, **kwargs)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(error) as want:
        ref(*args)
    with pytest.raises(error, match=match or f"^{re.escape(str(want.value))}$"):
        ours(*args)


x3 = torch.randn(4, 2, 5)
V, R, I = ValueError, RuntimeError, IndexError
LAYER_CASES = {
    # name: (class, ctor kwargs, input, hx, exception, message when not torch's)
    "1d-input": ("LSTM", {}, torch.randn(5), None, V, None),
    "4d-input": ("GRU", {}, torch.randn(1, 4, 2, 5), None, V, None),
    "4d-input-rnn": ("RNN", {}, torch.randn(1, 4, 2, 5), None, V, None),
    "feature-size": ("LSTM", {}, torch.randn(4, 2, 6), None, R, None),
    "feature-size-gru": ("GRU", {}, torch.randn(4, 2, 6), None, R, None),
    "h0-batch": ("GRU", {}, x3, torch.zeros(1, 3, 7), R, None),
    "h0-hidden": ("RNN", {}, x3, torch.zeros(1, 2, 8), R, None),
    "h0-layers": ("GRU", {"num_layers": 2}, x3, torch.zeros(1, 2, 7), R, None),
    "h0-bidir": ("RNN", {"bidirectional": True}, x3, torch.zeros(1, 2, 7), R, None),
    "lstm-c0-batch": ("LSTM", {}, x3, (torch.zeros(1, 2, 7), torch.zeros(1, 3, 7)), R, None),
    "lstm-c0-size": ("LSTM", {"proj_size": 3}, x3, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)), R, None),
    "lstm-h0-proj-size": ("LSTM", {"proj_size": 3}, x3, (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7)), R, None),
    "lstm-no-c0": ("LSTM", {}, x3, (torch.zeros(1, 2, 7),), I, None),
    "lstm-tensor-state": ("LSTM", {}, x3, torch.zeros(1, 2, 7), I, None),
    "lstm-three-states": ("LSTM", {}, x3, (torch.zeros(1, 2, 7),) * 3, R, None),
    "unbatched-input-batched-state": ("GRU", {}, torch.randn(4, 5), torch.zeros(1, 2, 7), R, None),
    "unbatched-input-batched-state-lstm": ("LSTM", {}, torch.randn(4, 5), (torch.zeros(1, 2, 7),) * 2, R, None),
    "batched-input-unbatched-state": ("RNN", {}, x3, torch.zeros(1, 7), R, None),
    "batched-input-unbatched-state-lstm": ("LSTM", {}, x3, (torch.zeros(1, 7),) * 2, R, None),
    "empty-sequence": ("LSTM", {}, torch.randn(0, 2, 5), None, R, None),
    "empty-sequence-batch-first": ("GRU", {"batch_first": True}, torch.randn(2, 0, 5), None, R, None),
    "double-input": ("LSTM", {}, x3.double(), None, V, None),
    "int-input": ("GRU", {}, torch.ones(4, 2, 5, dtype=torch.long), None, V, None),
    "half-input": ("RNN", {}, x3.half(), None, V, None),
    # torch.nn: "mat1 and mat2 must have the same dtype"
    "h0-dtype": ("GRU", {}, x3, torch.zeros(1, 2, 7, dtype=torch.float64), R,
                 r"^hx has dtype torch.float64, but the input has dtype torch.float32$"),
    # torch.nn: "mat1 and mat2 shapes cannot be multiplied"
    "packed-feature-size": ("LSTM", {}, pack_sequence([torch.randn(3, 6), torch.randn(2, 6)]), None, R,
                            r"^input.size\(-1\) must be equal to input_size. Expected 5, got 6$"),
    "packed-h0-batch": ("GRU", {}, pack_sequence([torch.randn(3, 5), torch.randn(2, 5)]), torch.zeros(1, 3, 7), R,
                        None),
    "packed-double-input-gru": ("GRU", {}, pack_sequence([torch.randn(3, 5).double()]), None, V, None),
    # torch.nn's packed LSTM leaves its checks to aten: "mat1 and mat2 must have the same dtype, but got Double and
    # Float"; "Dimension out of range (expected to be in range of [-2, 1], but got 2)"
    "packed-double-input-lstm": ("LSTM", {}, pack_sequence([torch.randn(3, 5).double()]), None, R,
                                 r"^mat1 and mat2 must have the same dtype, but got torch.float64 \(a PackedSequence's "
                                 r"data\) and torch.float32 \(the weights\)$"),
    "packed-unbatched-state-lstm": ("LSTM", {}, pack_sequence([torch.randn(3, 5)]), (torch.zeros(1, 7),) * 2, I,
                                    r"^For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\)"),
    "packed-tensor-hx-lstm": ("LSTM", {}, pack_sequence([torch.randn(3, 5)]), torch.zeros(1, 1, 7), TypeError,
                              r"^lstm\(\): argument 'hx' must be a tuple of Tensors, not Tensor$"),
    "packed-one-state-lstm": ("LSTM", {}, pack_sequence([torch.randn(3, 5)]), (torch.zeros(1, 1, 7),), R, None),
    "packed-float-states-lstm": ("LSTM", {}, pack_sequence([torch.randn(3, 5)]), (1.0, 2.0), TypeError,
                                 r"^lstm\(\): argument 'hx' must be a tuple of Tensors, not tuple of other types$"),
    "unsorted-1d-hx-gru": ("GRU", {}, pack_sequence([torch.randn(2, 5), torch.randn(3, 5)], enforce_sorted=False),
                           torch.zeros(7), I, r"^Dimension out of range .* hx has 1 dimension$"),
    # torch.nn: "expected scalar type Long but found Int"; "zeros(): argument 'size' failed to unpack ..."
    "packed-int32-batch-sizes": ("GRU", {}, PackedSequence(torch.randn(3, 5), torch.ones(3, dtype=torch.int32)), None,
                                 R, r"^a PackedSequence's batch_sizes must be a 1-D int64 tensor"),
    "packed-float-batch-sizes": ("LSTM", {}, PackedSequence(torch.randn(3, 5), torch.tensor([1.0, 1.0, 1.0])), None,
                                 TypeError, r"^a PackedSequence's batch_sizes must be a 1-D int64 tensor"),
    "packed-h0-dtype-lstm": ("LSTM", {}, pack_sequence([torch.randn(3, 5)]),
                             (torch.zeros(1, 1, 7, dtype=torch.bfloat16), torch.zeros(1, 1, 7)), R,
                             r"^hx\[0\] has dtype torch.bfloat16, but the input has dtype torch.float32$"),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_bad_input(backend, name):
    cls, kwargs, x, hx, error, match = LAYER_CASES[name]
    _same_error(cls, backend, error, match, x, hx, **kwargs)


def test_packed_lstm_four_d_state_raises(backend):
    """torch.nn's packed LSTM crashes the process on 4-D states (aten reads past them); rnnfast raises."""
    device = backend_device(backend)
    _, ours = twins("LSTM", backend, 5, 7, device=device)
    states = tuple(torch.zeros(1, 1, 1, 7, device=device) for _ in range(2))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        ours(pack_sequence([torch.randn(3, 5, device=device)]), states)


@pytest.mark.parametrize("c_dtype", [torch.bfloat16, torch.float16])
def test_packed_lstm_narrower_c0_like_torch(backend, c_dtype):
    """torch.nn's packed LSTM takes a c0 of a narrower float type than its float32 weights (the first update
    promotes it) and returns float32 states; rnnfast the same, values and gradients. Of equal lengths, which
    aten runs on oneDNN, both raise RuntimeError."""
    device = backend_device(backend)
    ref, ours = twins("LSTM", backend, 5, 7, device=device)
    c = torch.zeros(1, 2, 7, device=device, dtype=c_dtype)
    equal = pack_sequence([torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)])
    for m in (ref, ours):
        with pytest.raises(RuntimeError):
            m(equal, (torch.zeros(1, 2, 7, device=device), c))
    x = pack_sequence([torch.randn(4, 5, device=device), torch.randn(2, 5, device=device)])
    h0 = torch.randn(1, 2, 7, device=device)
    c0 = torch.randn(1, 2, 7, device=device).to(c_dtype)
    results = []
    for m in (ref, ours):
        c = c0.clone().requires_grad_()
        out, (h_n, c_n) = m(x, (h0, c))
        (out.data.sum() + c_n.sum()).backward()
        results.append((out.data, h_n, c_n, c.grad))
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


_DTYPE_MISMATCH = r"^{}: input dtype \(torch.{}\) does not match weight dtype \(torch.float32\)$"
CELL_CASES = {
    # name: (class, input, hx, exception, message when not torch's)
    "3d-input": ("LSTMCell", torch.randn(1, 2, 5), None, V, None),
    "feature-size": ("GRUCell", torch.randn(2, 6), None, R, None),
    "batch": ("RNNCell", torch.randn(2, 5), torch.zeros(3, 7), R, None),
    "hidden": ("GRUCell", torch.randn(2, 5), torch.zeros(2, 8), R, None),
    "lstm-c-batch": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7), torch.zeros(3, 7)), R, None),
    "lstm-c-hidden": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7), torch.zeros(2, 8)), R, None),
    "3d-hidden": ("RNNCell", torch.randn(2, 5), torch.zeros(1, 2, 7), V, None),
    "lstm-three-states": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7),) * 3, R, None),
    "lstm-one-state": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7),), R, None),
    # torch.nn: "mat1 and mat2 must have the same dtype" for these three
    "double-input": ("GRUCell", torch.randn(2, 5).double(), None, R, _DTYPE_MISMATCH.format("GRUCell", "float64")),
    "int-input": ("LSTMCell", torch.ones(2, 5, dtype=torch.long), None, R,
                  _DTYPE_MISMATCH.format("LSTMCell", "int64")),
    "hidden-dtype": ("RNNCell", torch.randn(2, 5), torch.zeros(2, 7, dtype=torch.float64), R,
                     r"^hidden0 has dtype torch.float64, but the input has dtype torch.float32$"),
    "lstm-tensor-hx": ("LSTMCell", torch.randn(2, 5), torch.zeros(2, 7), TypeError, None),
    "lstm-bad-third-state": ("LSTMCell", torch.randn(2, 5), (torch.zeros(2, 7),) * 2 + (torch.zeros(1, 1, 7),), V,
                             None),
    # torch.nn: "tuple index out of range" (its forward takes hx[1])
    "lstm-unbatched-one-state": ("LSTMCell", torch.randn(5), (torch.zeros(7),), I,
                                 r"^LSTMCell: an unbatched call's hx holds \(h, c\), got 1 state$"),
}


@pytest.mark.parametrize("name", list(CELL_CASES))
def test_cell_bad_input(backend, name):
    cls, x, hx, error, match = CELL_CASES[name]
    _same_error(cls, backend, error, match, x, hx)


def test_parametrized_cell_reads_its_weights_once_on_a_bad_dtype(backend):
    """A call that raises for its input's dtype has read the weights as often as torch.nn's cell
    (once): a stateful parametrization (spectral norm's power iteration) steps alike."""
    ref, ours = twins("GRUCell", backend, 5, 7, device=backend_device(backend))
    for m in (ref, ours):
        torch.manual_seed(0)
        torch.nn.utils.parametrizations.spectral_norm(m, "weight_hh")
        m.train()
        with pytest.raises(RuntimeError):
            m(torch.randn(2, 5, dtype=torch.float64, device=backend_device(backend)))
    u = [m.parametrizations.weight_hh[0]._u for m in (ref, ours)]
    assert torch.equal(u[0], u[1])


def test_rnn_cell_unknown_nonlinearity_at_forward():
    _same_error("RNNCell", "reference", RuntimeError, None, torch.randn(2, 5), None, nonlinearity="sigmoid")


CTOR_CASES = [
    ("RNN", dict(nonlinearity="sigmoid"), ValueError),
    ("LSTM", dict(dropout=1.5), ValueError),
    ("GRU", dict(dropout=-0.1), ValueError),
    ("LSTM", dict(dropout=True), ValueError),
    ("LSTM", dict(hidden_size=0), ValueError),
    ("GRU", dict(hidden_size=-1), ValueError),
    ("RNN", dict(input_size=0), ValueError),
    ("LSTM", dict(num_layers=0), ValueError),
    ("LSTM", dict(proj_size=7), ValueError),
    ("LSTM", dict(proj_size=-1), ValueError),
    ("GRU", dict(proj_size=3), ValueError),  # only LSTM supports projections
    ("GRU", dict(bias=1), TypeError),
    ("LSTM", dict(batch_first="yes"), TypeError),
    ("RNN", dict(input_size=5.0), TypeError),
]


@pytest.mark.parametrize("cls,kwargs,error", CTOR_CASES, ids=[f"{c}-{'-'.join(k)}" for c, k, _ in CTOR_CASES])
def test_bad_constructor(cls, kwargs, error):
    args = dict(input_size=5, hidden_size=7)
    args.update(kwargs)
    with pytest.raises(error) as want:
        getattr(torch.nn, cls)(**args)
    with pytest.raises(error, match=f"^{re.escape(str(want.value))}$"):
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


@pytest.mark.parametrize("batch", [2, 8])
@pytest.mark.parametrize("where", ["input", "weight_ih", "weight_hh"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN", "RNN-relu", "LSTMCell", "GRUCell", "RNNCell", "RNNCell-relu"])
def test_nonfinite_propagate_like_torch(backend, family, value, where, batch):
    """A NaN or infinite input or weight gives torch.nn's outputs and torch.nn's gradients, NaN where its
    are NaN and infinite where its are: an infinite pre-activation saturates a gate to exactly 0 or 1, whose
    zero slope times the infinite input is NaN in the weight gradient; with a zero initial state (hx None)
    the first step's recurrent product and its share of dW_hh are 0 x NaN = NaN where W_hh or a gate
    gradient is not finite, as torch.nn computes them; a NaN passes ReLU, as torch's relu lets it. Batches
    of 2 and 8 rows: the cpu backend's fused loop projects the inputs by chunks at the one and in each step's
    tiles at the other."""
    device = backend_device(backend)
    family, _, nonlinearity = family.partition("-")
    cell = family.endswith("Cell")
    kwargs = {} if cell else {"num_layers": 2}
    if nonlinearity:
        kwargs["nonlinearity"] = nonlinearity
    ref, ours = twins(family, backend, 5, 7, **kwargs, device=device)
    x = torch.randn(*((3 * batch // 2,) if cell else (4, batch)), 5, device=device)
    if where == "input":
        x[(1, 0) if cell else (1, 0, 2)] = value
    else:
        with torch.no_grad():
            for m in (ref, ours):
                getattr(m, where if cell else where + "_l0")[2, 3] = value
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        outs = flat(m(xi))  # the output (a cell's h) first, then the states
        outs[0].sum().backward()
        results.append([*outs, xi.grad, *(p.grad for p in m.parameters())])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
def test_nonfinite_weight_one_row_like_torch(backend, family, value):
    """Inference on one row (the cpu backend's decode path) with a non-finite W_hh and a zero state: the
    first step's product 0 x NaN is NaN, as torch.nn's."""
    device = backend_device(backend)
    ref, ours = twins(family, backend, 5, 7, num_layers=2, device=device)
    with torch.no_grad():
        for m in (ref, ours):
            m.weight_hh_l1[2, 3] = value
        x = torch.randn(1, 1, 5, device=device)
        for want, got in zip(flat(ref(x)), flat(ours(x))):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
