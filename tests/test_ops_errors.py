"""Direct calls to the CPU backend's operators (``torch.ops.rnnfast.layer_fwd`` /
``layer_bwd``, ``rnnfast._C.decode``, and the eager entries ``_C.layer_fwd_eager`` /
``_C.cell_eager`` / ``_C.stack_eager``) with wrong shapes, dtypes, devices, strides or
batch sizes: a RuntimeError naming the argument (from the TORCH_CHECKs of
csrc/cpu/checks.cpp), never a crash or a read out of bounds; strided arguments
are fine. A fuzz of random bad calls runs in a subprocess, so a crash fails the
test instead of killing pytest (``make fuzz`` runs a long one)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

import rnnfast
from rnnfast.backend import MODE_ID

pytestmark = pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")

FWD_ARGS = ("mode", "x", "batch_sizes", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "reverse", "save")
BWD_ARGS = ("mode", "x", "batch_sizes", "h0", "c0", "w_ih", "w_hh", "w_hr", "has_bias", "reverse", "out", "ws1",
            "ws2", "grad_out", "grad_hn", "grad_cn")
T, B, I, H = 4, 3, 5, 6


def fwd_args(mode: str = "LSTM", P: int = 0, packed: bool = False, dtype=torch.float32) -> dict:
    """A valid layer_fwd call (T, B, I, H above; proj_size P; lengths 4, 3, 1 when packed)."""
    g = torch.Generator().manual_seed(0)
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    K = P or H

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=dtype)

    return dict(mode=MODE_ID[mode], x=rnd(T, B, I), batch_sizes=torch.tensor([3, 2, 2, 1]) if packed else None,
                h0=rnd(B, K), c0=rnd(B, H) if mode == "LSTM" else None, w_ih=rnd(G * H, I), w_hh=rnd(G * H, K),
                b_ih=rnd(G * H), b_hh=rnd(G * H), w_hr=rnd(P, H) if P else None, reverse=False, save=True)


def bwd_args(mode: str = "LSTM", P: int = 0, packed: bool = False, dtype=torch.float32) -> dict:
    """A valid layer_bwd call: what the valid forward above saved, and gradients."""
    f = fwd_args(mode, P, packed, dtype)
    out, _, _, ws1, ws2 = torch.ops.rnnfast.layer_fwd(*(f[k] for k in FWD_ARGS))
    grads = dict(grad_out=torch.randn_like(out), grad_hn=torch.randn_like(f["h0"]),
                 grad_cn=torch.randn_like(f["c0"]) if mode == "LSTM" else f["x"].new_zeros(0))
    return dict(f, has_bias=True, out=out, ws1=ws1, ws2=ws2, **grads)


def call_fwd(args: dict):
    return torch.ops.rnnfast.layer_fwd(*(args[k] for k in FWD_ARGS))


def call_bwd(args: dict):
    return torch.ops.rnnfast.layer_bwd(*(args[k] for k in BWD_ARGS))


def call_fwd_eager(args: dict):
    return rnnfast.cpu._C.layer_fwd_eager(*(args[k] for k in FWD_ARGS))


CELL_ARGS = ("mode", "x", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh", "decode", "save")


def cell_args(mode: str = "LSTM", decode: bool = False, dtype=torch.float32) -> dict:
    """A valid _C.cell_eager call: one step of B rows (the decode path if asked)."""
    f = fwd_args(mode, dtype=dtype)
    return dict(mode=f["mode"], x=f["x"][0], h=f["h0"], c=f["c0"], w_ih=f["w_ih"], w_hh=f["w_hh"], b_ih=f["b_ih"],
                b_hh=f["b_hh"], decode=decode, save=not decode)


def call_cell(args: dict):
    return rnnfast.cpu._C.cell_eager(*(args[k] for k in CELL_ARGS))


def decode_args(mode: str = "GRU", layers: int = 2, dtype=torch.float32, P: int = 0) -> dict:
    """A valid _C.decode call: a unidirectional stack of ``layers`` with biases, T = 1 (LSTM: proj_size P)."""
    g = torch.Generator().manual_seed(0)
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    S = P or H  # the state's size
    weights = []
    for layer in range(layers):
        for shape in ((G * H, I if layer == 0 else S), (G * H, S), (G * H,), (G * H,)) + (((P, H),) if P else ()):
            weights.append(torch.randn(shape, generator=g, dtype=dtype))
    lstm = mode == "LSTM"
    return dict(mode=MODE_ID[mode], weights=weights, num_layers=layers, has_bias=True,
                x=torch.randn(1, B, I, dtype=dtype), h0=torch.zeros(layers, B, S, dtype=dtype),
                c0=torch.zeros(layers, B, H, dtype=dtype) if lstm else None)


def call_decode(args: dict):
    return rnnfast.cpu._C.decode(*args.values())


def stack_args(mode: str = "GRU", layers: int = 2, bidirectional: bool = False, dtype=torch.float32,
               P: int = 0) -> dict:
    """A valid _C.stack_eager call: ``layers`` with biases, both directions if asked (LSTM: proj_size P), T steps."""
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(0)
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    S = P or H
    weights = []
    for layer in range(layers):
        for _ in range(D):
            for shape in ((G * H, I if layer == 0 else D * S), (G * H, S), (G * H,), (G * H,)) + (((P, H),) if P else ()):
                weights.append(torch.randn(shape, generator=g, dtype=dtype))
    lstm = mode == "LSTM"
    return dict(mode=MODE_ID[mode], x=torch.randn(T, B, I, dtype=dtype), h0=torch.zeros(layers * D, B, S, dtype=dtype),
                c0=torch.zeros(layers * D, B, H, dtype=dtype) if lstm else None, weights=weights, num_layers=layers,
                bidirectional=bidirectional, has_bias=True, dropout=0.0)


def call_stack(args: dict):
    return rnnfast.cpu._C.stack_eager(*args.values())


def raises_after(edit: Callable[[dict], None], args: dict, call: Callable[[dict], object], match: str) -> None:
    """``call(args)`` runs as built, and raises a RuntimeError matching ``match`` once ``edit`` broke args."""
    call(args)
    edit(args)
    with pytest.raises(RuntimeError, match=match):
        call(args)


def _edit(**changes) -> Callable[[dict], None]:
    return lambda args: args.update(changes)


# (id, mode, proj_size, packed, edit of the valid arguments, message the RuntimeError matches)
FWD_CASES = [
    ("mode-unknown", "LSTM", 0, False, _edit(mode=7), "unknown mode 7"),
    ("mode-negative", "GRU", 0, False, _edit(mode=-1), "unknown mode -1"),
    ("x-2d", "GRU", 0, False, lambda a: a.update(x=a["x"][0]), r"input must be 3-D"),
    ("x-int", "RNN_TANH", 0, False, lambda a: a.update(x=a["x"].long()),
     "float32, float64, bfloat16 or float16, got Long"),
    ("x-complex", "LSTM", 0, False, lambda a: a.update(x=a["x"].cfloat()),
     "float32, float64, bfloat16 or float16, got ComplexFloat"),
    ("x-no-steps", "GRU", 0, False, lambda a: a.update(x=a["x"][:0]), "at least one time step"),
    ("x-no-features", "LSTM", 2, False, lambda a: a.update(x=a["x"][..., :0], w_ih=a["w_ih"][:, :0]),
     r"input_size \(input.size\(2\)\) must be positive"),
    ("h0-dtype", "GRU", 0, False, lambda a: a.update(h0=a["h0"].double()), "h0 has dtype Double but the input"),
    ("h0-batch", "GRU", 0, False, lambda a: a.update(h0=torch.zeros(B + 1, H)), r"h0 has shape \[4, 6\], expected"),
    ("h0-3d", "RNN_TANH", 0, False, lambda a: a.update(h0=a["h0"][None]), r"h0 has shape \[1, 3, 6\]"),
    ("h0-proj", "LSTM", 2, False, lambda a: a.update(h0=torch.zeros(B, H)),
     r"h0 has shape \[3, 6\], expected \[3, 2\]"),
    ("c0-missing", "LSTM", 0, False, _edit(c0=None), "LSTM needs c0"),
    ("c0-hidden", "LSTM", 0, False, lambda a: a.update(c0=torch.zeros(B, H + 1)), "c0 has shape"),
    ("c0-dtype", "LSTM", 0, False, lambda a: a.update(c0=a["c0"].double()), "c0 has dtype Double"),
    ("c0-not-h0-dtype", "LSTM", 0, False, lambda a: a.update(x=a["x"].bfloat16(), c0=a["c0"].bfloat16()),
     "c0 has dtype BFloat16 but h0 has dtype Float"),
    ("w_ih-cols", "LSTM", 0, False, lambda a: a.update(w_ih=torch.zeros(4 * H, I + 1)), "weight_ih has shape"),
    ("w_ih-rows", "GRU", 0, False, lambda a: a.update(w_ih=torch.zeros(4 * H, I)), "weight_ih has shape"),
    ("w_hh-rows", "LSTM", 0, False, lambda a: a.update(w_hh=torch.zeros(4 * H + 1, H)), "positive multiple of 4"),
    ("w_hh-no-rows", "RNN_RELU", 0, False, lambda a: a.update(w_hh=torch.zeros(0, H)), "positive multiple of 1"),
    ("w_hh-cols", "GRU", 0, False, lambda a: a.update(w_hh=torch.zeros(3 * H, H + 1)), "weight_hh has shape"),
    ("w_hh-1d", "GRU", 0, False, lambda a: a.update(w_hh=a["w_hh"].flatten()), "weight_hh must be 2-D"),
    ("w_hh-dtype", "RNN_TANH", 0, False, lambda a: a.update(w_hh=a["w_hh"].double()), "weight_hh has dtype Double"),
    ("bias-one", "LSTM", 0, False, _edit(b_hh=None), "both be given or both be None"),
    ("bias-shape", "GRU", 0, False, lambda a: a.update(b_ih=torch.zeros(3 * H + 1)), "bias_ih has shape"),
    ("proj-gru", "GRU", 0, False, lambda a: a.update(w_hr=torch.zeros(2, H)), "only supported for LSTM"),
    ("proj-shape", "LSTM", 2, False, lambda a: a.update(w_hr=torch.zeros(2, H + 1)), "weight_hr has shape"),
    ("lengths-float", "GRU", 0, True, lambda a: a.update(batch_sizes=a["batch_sizes"].float()), "integer CPU"),
    ("lengths-count", "LSTM", 0, True, lambda a: a.update(batch_sizes=torch.tensor([3, 2, 1])), "one entry per"),
    ("lengths-rising", "RNN_TANH", 0, True, lambda a: a.update(batch_sizes=torch.tensor([2, 3, 1, 1])),
     "non-increasing"),
    ("lengths-past-batch", "LSTM", 0, True, lambda a: a.update(batch_sizes=torch.tensor([4, 2, 2, 1])),
     "at most the batch size"),
    ("lengths-negative", "GRU", 0, True, lambda a: a.update(batch_sizes=torch.tensor([3, 2, 0, -1])),
     "non-increasing"),
    ("device-meta", "GRU", 0, False, lambda a: a.update(h0=a["h0"].to("meta")), "h0 is on meta, must be on the"),
    ("device-meta-weight", "LSTM", 2, False, lambda a: a.update(w_hr=a["w_hr"].to("meta")), "w_hr is on meta"),
]


@pytest.mark.parametrize("mode, P, packed, edit, match", [pytest.param(*c[1:], id=c[0]) for c in FWD_CASES])
def test_layer_fwd_bad_call(mode, P, packed, edit, match):
    raises_after(edit, fwd_args(mode, P, packed), call_fwd, match)


@pytest.mark.parametrize("save", [False, True], ids=["no-save", "save"])
@pytest.mark.parametrize("mode, P, packed, edit, match", [pytest.param(*c[1:], id=c[0]) for c in FWD_CASES[::3]])
def test_layer_fwd_eager_bad_call(mode, P, packed, edit, match, save):
    """The eager entry reaches the operator's checks (through the dispatcher, with or without its node)."""
    raises_after(edit, dict(fwd_args(mode, P, packed), save=save), call_fwd_eager, match)


CELL_CASES = [
    ("x-3d", "GRU", False, lambda a: a.update(x=a["x"][None]), "x and h must be 2-D"),
    ("h-1d", "LSTM", True, lambda a: a.update(h=a["h"][0]), "x and h must be 2-D"),
    ("h-batch", "GRU", False, lambda a: a.update(h=torch.zeros(B + 1, H)), "h0 has shape"),
    ("h-batch-decode", "GRU", True, lambda a: a.update(h=torch.zeros(B + 1, H)), "h0 has shape"),
    ("c-missing", "LSTM", False, _edit(c=None), "LSTM needs c0"),
    ("c-missing-decode", "LSTM", True, _edit(c=None), "LSTM needs c0"),
    ("x-features-decode", "RNN_TANH", True, lambda a: a.update(x=torch.zeros(B, I + 1)), "weight_ih_l0 has shape"),
    ("mode-unknown", "GRU", True, _edit(mode=5), "unknown mode 5"),
    ("bias-one-decode", "RNN_RELU", True, _edit(b_hh=None), "both be given or both be None"),
    ("bias-one", "LSTM", False, _edit(b_ih=None), "both be given or both be None"),
    ("w_hh-dtype", "LSTM", False, lambda a: a.update(w_hh=a["w_hh"].double()), "weight_hh has dtype Double"),
]


@pytest.mark.parametrize("mode, decode, edit, match", [pytest.param(*c[1:], id=c[0]) for c in CELL_CASES])
def test_cell_eager_bad_call(mode, decode, edit, match):
    raises_after(edit, cell_args(mode, decode), call_cell, match)


def _stride(t: torch.Tensor) -> torch.Tensor:
    """The same values, every dimension strided (a copy twice as wide, sliced)."""
    wide = torch.zeros([2 * n for n in t.shape], dtype=t.dtype)
    view = wide[tuple(slice(0, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


@pytest.mark.parametrize("mode, P", [("LSTM", 0), ("LSTM", 2), ("GRU", 0), ("RNN_RELU", 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_strided_arguments_match_contiguous(mode, P, dtype):
    """Operators take any strides: every tensor argument strided gives the contiguous call's results."""
    for op, make in ((call_fwd, fwd_args), (call_bwd, bwd_args)):
        args = make(mode, P, True, dtype)
        want = op(args)
        strided = {k: _stride(v) if isinstance(v, torch.Tensor) and v.dim() and k not in ("out", "ws1", "ws2")
                   else v for k, v in args.items()}
        got = op(strided)
        # the forward's out, h_n, c_n; not what it saves for backward, unwritten in rows packing leaves inactive
        for k, (a, b) in enumerate(zip(got[:3] if op is call_fwd else got, want)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{op.__name__} output {k}: {m}")


BWD_CASES = [
    ("not-saved", "GRU", 0, lambda a: a.update(ws1=torch.zeros(0)), "ws1 must be what layer_fwd saves"),
    ("ws1-strided", "LSTM", 0, lambda a: a.update(ws1=_stride(a["ws1"])), "ws1 must be contiguous"),
    ("ws1-shape", "LSTM", 0, lambda a: a.update(ws1=a["ws1"][:, :2].contiguous()), "ws1 has shape"),
    ("ws2-shape", "LSTM", 2, lambda a: a.update(ws2=a["ws2"][:1].contiguous()), r"ws2 has shape \[1, 4, 3, 6\]"),
    ("out-shape", "RNN_TANH", 0, lambda a: a.update(out=a["out"][1:].contiguous()), "out has shape"),
    ("out-dtype", "GRU", 0, lambda a: a.update(out=a["out"].double()), "out has dtype Double"),
    ("out-not-h0-dtype", "GRU", 0, lambda a: a.update(x=a["x"].bfloat16(), h0=a["h0"].bfloat16()),
     "out has dtype Float but h0 has dtype BFloat16"),
    ("grad-not-h0-dtype", "LSTM", 0, lambda a: a.update(x=a["x"].bfloat16(), grad_cn=a["grad_cn"].bfloat16()),
     "grad_cn has dtype BFloat16 but h0 has dtype Float"),
    ("grad-device", "RNN_TANH", 0, lambda a: a.update(grad_out=a["grad_out"].to("meta")), "grad_out is on meta"),
    ("grad-out-shape", "GRU", 0, lambda a: a.update(grad_out=a["grad_out"][:, :2]), "grad_out has shape"),
    ("grad-hn-shape", "LSTM", 0, lambda a: a.update(grad_hn=a["grad_hn"][None]), "grad_hn has shape"),
    ("grad-cn-missing", "LSTM", 0, lambda a: a.update(grad_cn=torch.zeros(0)), r"grad_cn has shape \[0\]"),
    ("w_ih-shape", "RNN_RELU", 0, lambda a: a.update(w_ih=a["w_ih"][:, 1:]), "weight_ih has shape"),
    ("mode-unknown", "GRU", 0, _edit(mode=4), "unknown mode 4"),
    ("lengths-count", "GRU", 0, lambda a: a.update(batch_sizes=torch.tensor([3, 2])), "one entry per time step"),
]


@pytest.mark.parametrize("mode, P, edit, match", [pytest.param(*c[1:], id=c[0]) for c in BWD_CASES])
def test_layer_bwd_bad_call(mode, P, edit, match):
    raises_after(edit, bwd_args(mode, P, packed=True), call_bwd, match)


DECODE_CASES = [
    ("mode-unknown", "GRU", _edit(mode=9), "unknown mode 9"),
    ("no-layers", "GRU", lambda a: a.update(num_layers=0, weights=[]), "num_layers must be at least 1"),
    ("weight-count", "LSTM", lambda a: a["weights"].pop(), "expected 8 weights"),
    ("no-weights", "RNN_TANH", lambda a: a.update(weights=[]), "expected 8 weights"),
    ("h0-2d", "GRU", lambda a: a.update(h0=a["h0"][0]), "h0 must be 3-D"),
    ("h0-layers", "GRU", lambda a: a.update(h0=a["h0"][:1]), r"h0 has shape \[1, 3, 6\], expected \[2, 3, 6\]"),
    ("c0-missing", "LSTM", _edit(c0=None), "LSTM needs c0"),
    ("c0-shape", "LSTM", lambda a: a.update(c0=a["c0"][:, :1]), "c0 has shape"),
    ("c0-wider", "LSTM", lambda a: a.update(c0=torch.zeros(2, B, H + 1)), "expected 10 weights .* with weight_hr"),
    ("c0-narrower", "LSTM", lambda a: a.update(c0=torch.zeros(2, B, H - 1)), "must be smaller than hidden_size"),
    ("w_hr-shape", "LSTM",
     lambda a: (a.update(decode_args("LSTM", P=2)), a["weights"].__setitem__(9, torch.zeros(2, 1))),
     r"weight_hr_l1 has shape \[2, 1\], expected \[2, 6\]"),
    ("w_hr-missing", "LSTM", lambda a: (a.update(decode_args("LSTM", P=2)), a["weights"].pop()), "expected 10 weights"),
    ("layer1-input", "GRU", lambda a: a["weights"].__setitem__(4, torch.zeros(3 * H, I)), "weight_ih_l1 has shape"),
    ("bias-shape", "RNN_TANH", lambda a: a["weights"].__setitem__(3, torch.zeros(H + 1)), "bias_hh_l0 has shape"),
    ("x-feature", "LSTM", lambda a: a.update(x=torch.zeros(1, B, I + 1)), "weight_ih_l0 has shape"),
    ("x-dtype", "GRU", lambda a: a.update(x=a["x"].double()), "h0 has dtype Float but the input has dtype Double"),
    ("weight-dtype", "GRU", lambda a: a["weights"].__setitem__(1, a["weights"][1].double()), "weight_hh_l0 has dtype"),
]


@pytest.mark.parametrize("mode, edit, match", [pytest.param(*c[1:], id=c[0]) for c in DECODE_CASES])
def test_decode_bad_call(mode, edit, match):
    raises_after(edit, decode_args(mode), call_decode, match)


STACK_CASES = [
    ("mode-unknown", "GRU", _edit(mode=6), "unknown mode 6"),
    ("no-layers", "LSTM", lambda a: a.update(num_layers=0, weights=[]), "num_layers must be at least 1"),
    ("dropout-above-1", "GRU", _edit(dropout=1.5), r"dropout must be in \[0, 1\]"),
    ("weight-count", "LSTM", lambda a: a["weights"].pop(), "expected 8 weights"),
    ("bidirectional-count", "GRU", _edit(bidirectional=True), "num_layers x directions = 2 x 2"),
    ("x-2d", "RNN_TANH", lambda a: a.update(x=a["x"][0]), "input must be 3-D"),
    ("h0-2d", "GRU", lambda a: a.update(h0=a["h0"][0]), "num_layers x directions = 2 x 1"),
    ("h0-layers", "RNN_RELU", lambda a: a.update(h0=a["h0"][:1]), r"= 2 x 1 states, got shape \[1, 3, 6\]"),
    ("c0-missing", "LSTM", _edit(c0=None), "LSTM needs a 3-D c0 with 2"),
    ("c0-not-lstm", "GRU", lambda a: a.update(c0=torch.zeros(2, B, H)), "c0 is for LSTM only"),
    ("c0-wider", "LSTM", lambda a: a.update(c0=torch.zeros(2, B, H + 1)), "expected 10 weights"),
    ("layer1-input", "GRU", lambda a: a["weights"].__setitem__(4, torch.zeros(3 * H, I)), "weight_ih has shape"),
    ("x-dtype", "LSTM", lambda a: a.update(x=a["x"].double()), "has dtype Float but the input has dtype Double"),
    ("h0-batch", "GRU", lambda a: a.update(h0=torch.zeros(2, B + 1, H)), r"h0 has shape \[4, 6\], expected"),
    ("x-device", "RNN_TANH", lambda a: a.update(x=a["x"].to("meta")), "meta"),
]


@pytest.mark.parametrize("mode, edit, match", [pytest.param(*c[1:], id=c[0]) for c in STACK_CASES])
def test_stack_eager_bad_call(mode, edit, match):
    raises_after(edit, stack_args(mode), call_stack, match)


@pytest.mark.parametrize("mode, P", [("LSTM", 0), ("LSTM", 2), ("GRU", 0), ("RNN_RELU", 0)])
def test_stack_eager_matches_run_stack(mode, P):
    """The C++ stack is run_stack's loop: the same outputs, bitwise, and dropout draws the same masks."""
    args = stack_args(mode, layers=3, bidirectional=True, P=P)
    args.update(dropout=0.5, x=torch.randn(T, B, I), h0=torch.randn_like(args["h0"]),
                c0=None if args["c0"] is None else torch.randn_like(args["c0"]))
    spec = rnnfast.backend.RNNSpec(mode, I, H, num_layers=3, bidirectional=True, proj_size=P, dropout=0.5,
                                   training=True)
    torch.manual_seed(3)
    got = call_stack(args)
    torch.manual_seed(3)
    want = rnnfast.backend.Backend.rnn(rnnfast.backend.get_backend("cpu"), spec, args["x"], None, args["h0"],
                                       args["c0"], args["weights"])
    assert (got[2] is None) == (want[2] is None)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda C: C.pad_packed(torch.zeros(5, 2), torch.tensor([3, 3])), "sum to 6 rows, the packed data has 5"),
    (lambda C: C.pad_packed(torch.zeros(5, 2), torch.tensor([2, 3])), "non-increasing"),
    (lambda C: C.pad_packed(torch.zeros(0, 2), torch.tensor([], dtype=torch.long)), "1-D and non-empty"),
    (lambda C: C.pad_packed(torch.zeros(3, 2), torch.tensor([[3]])), "1-D and non-empty"),
    (lambda C: C.pack_padded(torch.zeros(2, 3, 4), torch.tensor([3, 4])), "non-increasing and at most"),
    (lambda C: C.pack_padded(torch.zeros(2, 3, 4), torch.tensor([3])), "one entry per time step"),
    (lambda C: C.pack_padded(torch.zeros(3), torch.tensor([1, 1, 1])), r"must be \(T, B, ...\), got shape \[3\]"),
    (lambda C: C.pad_packed(torch.tensor(1.0), torch.tensor([1])), "got a scalar"),
], ids=["pad-sum", "pad-increasing", "pad-empty", "pad-2d", "pack-too-many", "pack-steps", "pack-1d", "pad-0d"])
def test_packed_conversions_bad_call(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(rnnfast.cpu._C)


def run_bad_call_fuzz(calls: int, seed: int, timeout: float) -> str:
    """Run ``tests/fuzz_ops.py`` in a subprocess: a crash (signal) or an unexpected exception fails."""
    script = os.path.join(os.path.dirname(__file__), "fuzz_ops.py")
    result = subprocess.run([sys.executable, script, str(calls), str(seed)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"bad-call fuzz failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_fuzz_bad_calls_never_crash():
    out = run_bad_call_fuzz(300, seed=0, timeout=240)
    assert "calls 300" in out, out
