"""bfloat16 and autocast on every backend usable here: the output dtypes torch.nn gives under
``torch.autocast``, and bfloat16 numerics (outputs and gradients) no worse than torch.nn's own
bfloat16 against the same float32 reference, for bfloat16 modules and under autocast; float16
modules' numerics the same way."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast
from rnnfast.backend import BackendFallbackWarning

from conftest import ONEDNN_NO_BF16_LSTM, RecordOps, backend_device, torch_autocast_lstm_fails
from parity import TORCH_CLASSES, Case, make_inputs, needs_fused_loop, run_layer

BF16 = torch.bfloat16
CELLS = {"LSTMCell": torch.nn.LSTMCell, "GRUCell": torch.nn.GRUCell, "RNNCell": torch.nn.RNNCell}


def _leaves(obj) -> list[torch.Tensor]:
    """A call's output tensors in order, a packed sequence's data for the sequence."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "batch_sizes"):
        return [obj.data]
    return [t for o in obj for t in _leaves(o)]


def _dtypes(obj) -> list[torch.dtype]:
    return [t.dtype for t in _leaves(obj)]


def _bf16(obj):
    """obj with its floating tensors (and packed sequences' data) in bfloat16."""
    if isinstance(obj, torch.Tensor):
        return obj.to(BF16) if obj.is_floating_point() else obj
    if hasattr(obj, "batch_sizes"):
        return obj._replace(data=obj.data.to(BF16))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_bf16(o) for o in obj)
    return obj


def _onednn_lstm_missing(family: str, device: str, packed: bool, proj: bool) -> bool:
    """torch.nn's padded LSTM without projections runs on oneDNN under CPU autocast, which has no
    bfloat16 LSTM on CPUs without AVX-512 (an AVX2 EPYC): there torch.nn raises (conftest), or given
    bfloat16 input and float32 states returns float32. rnnfast keeps the rule of the CPUs where
    torch.nn runs, the same on every CPU; the tests compare with that rule there."""
    return family == "LSTM" and device == "cpu" and not packed and not proj and torch_autocast_lstm_fails()


def _twins(cls_name: str, backend: str, *args, **kwargs):
    torch.manual_seed(0)
    ref = (TORCH_CLASSES.get(cls_name) or CELLS[cls_name])(*args, **kwargs)
    ours = getattr(rnnfast, cls_name)(*args, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _layer_calls(family: str, device: str, lead: int, P: int):
    """(id, module dtype, args) for the calls whose output dtypes the autocast test compares; ``lead``
    states per batch row (layers x directions), h of size ``P``, c of size 6."""
    x = torch.randn(4, 3, 5, device=device)
    h, c = torch.randn(lead, 3, P, device=device), torch.randn(lead, 3, 6, device=device)
    hx = lambda dt, h=h: (h.to(dt), c[:, :h.size(1)].to(dt)) if family == "LSTM" else h.to(dt)  # noqa: E731
    packed = pack_padded_sequence(x, [4, 3, 1])
    return [
        ("no-hx", torch.float32, (x,)),
        ("hx", torch.float32, (x, hx(torch.float32))),
        ("bf16-hx", torch.float32, (x, hx(BF16))),
        ("bf16-input", torch.float32, (x.to(BF16),)),
        ("bf16-input-hx", torch.float32, (x.to(BF16), hx(torch.float32))),
        ("packed", torch.float32, (packed,)),
        ("packed-hx", torch.float32, (packed, hx(torch.float32))),
        ("packed-bf16-hx", torch.float32, (packed, hx(BF16))),
        ("batch1", torch.float32, (x[:, :1], hx(torch.float32, h[:, :1]))),
        ("unbatched", torch.float32, (x[:, 0],)),
        ("bf16-module", BF16, (x.to(BF16),)),
        ("float64", torch.float64, (x.double(),)),
    ]


@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("kwargs", [{}, dict(num_layers=2, bidirectional=True), dict(proj_size=4)],
                         ids=["one-layer", "L2-bidir", "proj"])
def test_autocast_dtypes_match_torch_layers(family, kwargs, backend):
    if "proj_size" in kwargs and family != "LSTM":
        pytest.skip("proj_size is LSTM's")
    device = backend_device(backend)
    lead = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    for name, dtype, args in _layer_calls(family, device, lead, kwargs.get("proj_size", 6)):
        ref, ours = _twins(family, backend, 5, 6, **kwargs)
        ref, ours = ref.to(device, dtype), ours.to(device, dtype)
        missing = dtype != torch.float64 and _onednn_lstm_missing(family, device, name.startswith("packed"),
                                                                  "proj_size" in kwargs)  # autocast leaves float64
        if missing:  # what torch.nn returns where it runs: the module and inputs in bfloat16, as autocast casts
            want = copy.deepcopy(ref).to(BF16)(*_bf16(args))
        with torch.autocast(device, dtype=BF16), warnings.catch_warnings():
            warnings.simplefilter("ignore", BackendFallbackWarning)  # a fallback must give the same dtypes
            if not missing:
                want = ref(*args)
            got = ours(*args)
        assert _dtypes(got) == _dtypes(want), f"{family} {name}: {_dtypes(got)} != torch's {_dtypes(want)}"


@pytest.mark.parametrize("family", list(CELLS))
def test_autocast_dtypes_match_torch_cells(family, backend):
    device = backend_device(backend)
    x, h = torch.randn(3, 5, device=device), torch.randn(3, 6, device=device)
    hx = lambda dt, h=h: (h.to(dt), h.to(dt)) if family == "LSTMCell" else h.to(dt)  # noqa: E731
    calls = [("no-hx", (x,)), ("hx", (x, hx(torch.float32))), ("bf16-hx", (x, hx(BF16))),
             ("bf16-input", (x.to(BF16),)), ("bf16-input-hx", (x.to(BF16), hx(torch.float32))),
             ("batch1", (x[:1], hx(torch.float32, h[:1]))), ("unbatched", (x[0],))]
    for name, args in calls:
        ref, ours = (m.to(device) for m in _twins(family, backend, 5, 6))
        with torch.autocast(device, dtype=BF16), warnings.catch_warnings():
            warnings.simplefilter("ignore", BackendFallbackWarning)  # a fallback must give the same dtypes
            want, got = ref(*args), ours(*args)
        assert _dtypes(got) == _dtypes(want), f"{family} {name}: {_dtypes(got)} != torch's {_dtypes(want)}"


def _outcome(call):
    """A call's output dtypes and shapes, or the type of what it raised."""
    try:
        out = call()
    except Exception as err:  # noqa: BLE001 (compared with torch.nn's)
        return type(err).__name__, str(err)
    return [(t.dtype, tuple(t.shape)) for t in _leaves(out)], None


ODD = (torch.float32, BF16, torch.float16, torch.float64)


@pytest.mark.parametrize("family, kwargs, packed", [
    ("LSTM", {}, False), ("LSTM", {}, True), ("LSTM", {}, "equal-lengths"), ("LSTM", dict(proj_size=2), False),
    ("GRU", {}, False), ("GRU", {}, True), ("RNN", {}, False), ("LSTMCell", {}, False), ("GRUCell", {}, False),
    ("RNNCell", {}, False)])
@pytest.mark.parametrize("mode", ["grad", "no-grad", "onednn-off", "float16-autocast"])
def test_autocast_mixed_dtypes_like_torch(family, kwargs, packed, mode, backend):
    """Under CPU autocast, every mix of module, input and state dtypes (float16 input, float64 module or
    states) gives torch.nn's output dtypes, or raises where torch.nn raises, with the same type."""
    if backend_device(backend) != "cpu":
        pytest.skip("CPU autocast's rules")
    cell = family.endswith("Cell")
    lstm = family.startswith("LSTM")
    P = kwargs.get("proj_size", 4)
    context = {"no-grad": torch.no_grad,
               "onednn-off": lambda: torch.backends.mkldnn.flags(enabled=False)}.get(mode, contextlib.nullcontext)
    low = torch.float16 if mode == "float16-autocast" else BF16
    for module_dtype, input_dtype, state_dtype in itertools.product(ODD[:2] + ODD[3:], ODD, (None,) + ODD):
        ref, ours = (m.to(module_dtype) for m in _twins(family, backend, 3, 4, **kwargs))
        x = torch.randn(2, 3) if cell else torch.randn(5, 2, 3)
        x = x.to(input_dtype)
        if packed:  # aten runs an LSTM's sequences of equal lengths as padded input
            x = pack_padded_sequence(x, [5, 5] if packed == "equal-lengths" else [5, 3])
        lead = () if cell else (1,)
        hx = None if state_dtype is None else (
            (torch.randn(*lead, 2, P).to(state_dtype), torch.randn(*lead, 2, 4).to(state_dtype)) if lstm
            else torch.randn(*lead, 2, 4).to(state_dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fallbacks (same dtypes) and torch's oneDNN notes
            with torch.autocast("cpu", dtype=low), context():
                want, why = _outcome(lambda: ref(x, hx))
                if why is not None and ONEDNN_NO_BF16_LSTM in why:
                    continue  # torch.nn's oneDNN has no LSTM in this dtype on this CPU (see _onednn_lstm_missing)
                got, _ = _outcome(lambda: ours(x, hx))
        assert got == want, f"{family}: {module_dtype} module, {input_dtype} input, {state_dtype} states: {got}, {want}"


@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("where", ["input", "state"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_autocast_leaves_non_float_alone_like_torch(family, where, dtype, backend):
    """Autocast casts only floating tensors: an integer, bool or complex input or state raises in torch.nn's
    products under autocast (its dtype check is off there); rnnfast raises the same type."""
    if backend_device(backend) != "cpu":
        pytest.skip("CPU autocast's rules")
    cell = family.endswith("Cell")
    ref, ours = _twins(family, backend, 3, 4)
    x = torch.randn(2, 3) if cell else torch.randn(5, 2, 3)
    h = torch.randn(*(() if cell else (1,)), 2, 4)
    if where == "input":
        x = x.to(dtype)
    else:
        h = h.to(dtype)
    hx = (h, h) if family.startswith("LSTM") else h
    with torch.autocast("cpu", dtype=BF16), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(Exception) as want:
            ref(x, hx)
        with pytest.raises(want.type):
            ours(x, hx)


# bfloat16 numerics: every option, as a bfloat16 module and under autocast
LAYER_CASES = [
    Case("base", I=13, H=37, T=6, B=5),
    Case("two-layers", dict(num_layers=2), I=16, H=32, T=5, B=4),
    Case("bidirectional", dict(bidirectional=True), I=9, H=33, T=5, B=3),
    Case("no-bias", dict(bias=False), I=8, H=20, T=4, B=3),
    Case("packed", dict(bidirectional=True), I=7, H=21, T=6, B=5, packed="unsorted"),
    Case("no-state", I=6, H=24, T=4, B=3, with_state=False),
    Case("batch-first", I=6, H=24, T=4, B=3, batch_first=True),
    Case("unbatched", I=6, H=24, T=4, B=1, unbatched=True),
    Case("long-wide", I=64, H=96, T=30, B=14),
    Case("batch1-odd", I=5, H=5, T=7, B=1),
    Case("packed-layers2-odd", dict(num_layers=2, bidirectional=True), I=9, H=17, T=8, B=6, packed="unsorted"),
    # odd sizes: units that fill no whole register, odd rows and gate widths (the bfloat16
    # products take rows and columns in pairs), batch 1 as a batch
    Case("odd-H5", I=5, H=5, T=7, B=3),
    Case("odd-H17-B1", I=17, H=17, T=9, B=1),
    Case("odd-H65-stack", dict(num_layers=2, bidirectional=True), I=33, H=65, T=8, B=6, packed="unsorted"),
    # several chunks of steps (about 256 rows each), each with an odd number of rows
    Case("chunks", I=19, H=65, T=40, B=31),
]
LSTM_ONLY = [Case("proj", dict(proj_size=7), I=6, H=24, T=4, B=3),
             Case("packed-proj", dict(proj_size=5, num_layers=2), I=7, H=17, T=6, B=4, packed="unsorted")]
RNN_ONLY = [Case("relu", dict(nonlinearity="relu"), I=17, H=65, T=9, B=5),
            Case("relu-packed", dict(nonlinearity="relu", bidirectional=True, num_layers=2), I=7, H=21, T=6, B=5,
                 packed="unsorted")]
PARAMS = [pytest.param(f, c, id=f"{f}-{c.id}") for f in ("LSTM", "GRU", "RNN") for c in LAYER_CASES]
PARAMS += [pytest.param("LSTM", c, id=f"LSTM-{c.id}") for c in LSTM_ONLY]
PARAMS += [pytest.param("RNN", c, id=f"RNN-{c.id}") for c in RNN_ONLY]
# bfloat16 error allowed against float32: torch.nn's own bfloat16 error, 1.5x, plus this (relative to max |value|)
SLACK = 4e-3


def _numerics_here(backend: str) -> None:
    if backend == "reference":
        pytest.skip("reference computes bfloat16 in bfloat16 throughout (the readable spec, not a fast path); "
                    "its dtypes are tested above")
    if backend != "cpu":
        pytest.skip(f"{backend}: bfloat16 on GPUs is tested in test_triton_backend.py")


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


def _compare_lowp(family: str, case: Case, backend: str, autocast: bool, dtype: torch.dtype = BF16) -> None:
    """rnnfast's error against float32 torch.nn is at most 1.5x torch.nn's own in the same setting: a
    module in ``dtype``, or under bfloat16 autocast."""
    kwargs = dict(case.kwargs, batch_first=case.batch_first)
    ref, ours = _twins(family, backend, case.I, case.H, **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    sizes = [kwargs.get("proj_size") or case.H] + ([case.H] if family == "LSTM" else [])
    inputs = make_inputs(case, sizes, kwargs.get("num_layers", 1) * D)
    want, want_g = run_layer(ref, case, inputs, torch.float32, "cpu")
    if not autocast:  # a bfloat16 module's own values: its weights, input and states rounded, in float32 (see below)
        rounded = {k: [t.to(dtype).double() for t in v] if k == "states" else v.to(dtype).double() if k == "x" else v
                   for k, v in inputs.items()}
        exact, exact_g = run_layer(copy.deepcopy(ref).to(dtype).float(), case, rounded, torch.float32, "cpu")

    def low(module):
        if autocast:
            with torch.autocast("cpu", dtype=BF16):
                return run_layer(copy.deepcopy(module), case, inputs, torch.float32, "cpu")
        return run_layer(copy.deepcopy(module).to(dtype), case, inputs, dtype, "cpu")

    # torch.nn's bfloat16 module where its autocast LSTM cannot run (see _onednn_lstm_missing), what it
    # runs elsewhere: its gradients are then bfloat16 where autocast's follow the float32 leaves
    as_module = autocast and _onednn_lstm_missing(family, "cpu", bool(case.packed), "proj_size" in kwargs)
    theirs, theirs_g = run_layer(copy.deepcopy(ref).to(BF16), case, inputs, BF16, "cpu") if as_module else low(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        got, got_g = low(ours)
    pairs = [(f"output {k}", got[k], theirs[k], want[k], None if autocast else exact[k]) for k in range(len(want))]
    pairs += [(f"grad {n}", got_g[n], theirs_g[n], want_g[n], None if autocast else exact_g[n]) for n in want_g]
    for name, g, t, w, e in pairs:
        if not (as_module and name.startswith("grad")):
            assert g.dtype == t.dtype, f"{name}: dtype {g.dtype}, torch.nn gives {t.dtype}"
        ours_err, torch_err = _max_err(g, w), _max_err(t, w)
        # A bfloat16 module may instead be as close as torch.nn's to the float32 result of the values
        # it holds: rounding the input moves relu's kinks, and a pre-activation that changes sign there
        # changes a gradient entry by its whole size (RNN relu widened to float32, on an AVX2 EPYC:
        # 0.19 against the original's float32, 4e-3 against the rounded values', torch.nn 0.026).
        closer = not autocast and _max_err(g, e) <= 1.5 * _max_err(t, e) + SLACK
        assert closer or ours_err <= 1.5 * torch_err + SLACK, (
            f"{name}: error {ours_err:.2e}, torch.nn bf16's {torch_err:.2e}")


@pytest.mark.parametrize("family, case", PARAMS)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-module", "autocast"])
def test_bf16_layers_no_worse_than_torch(family, case, autocast, backend):
    _numerics_here(backend)
    _compare_lowp(family, case, backend, autocast)


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@pytest.mark.parametrize("family, case", PARAMS)
def test_float16_layers_no_worse_than_torch(family, case):
    """float16 modules: the cpu backend runs the float32 loops on widened copies (no float16 loop, no
    fallback) and rounds the results; no worse than torch.nn's own float16 against float32. (reference
    computes float16 in float16; GPUs' float16 is tested in test_triton_backend.py)"""
    _compare_lowp(family, case, "cpu", False, torch.float16)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-module", "autocast"])
@pytest.mark.parametrize("T, B, I, H", [(40, 31, 19, 65), (12, 37, 64, 96)], ids=["odd", "whole-tiles"])
def test_bf16_gradients_exact_on_small_integers(packed, autocast, T, B, I, H, backend):
    """A relu RNN on small integers (one +-1 per row of weight_ih, a permutation as weight_hh) computes
    every value exactly in bfloat16 and every sum exactly in float32: the bfloat16 gradients then equal
    float64's, rounded once, so a row or a pair of rows dropped or mispaired shows, however few. T * B
    spans several chunks of steps, each with an odd number of rows; sizes odd, or (AMX) products whose
    K fills whole tiles, read in place, beside a last row tile that does not."""
    _numerics_here(backend)
    g = torch.Generator().manual_seed(0)
    ints = lambda *shape: torch.randint(-1, 2, shape, generator=g).double()  # noqa: E731
    ref = torch.nn.RNN(I, H, nonlinearity="relu", bidirectional=True).double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("weight_ih"):
                cols = torch.randint(0, I, (H, 1), generator=g)
                p.copy_(torch.zeros(H, I, dtype=torch.float64).scatter_(1, cols, ints(H, 1)))
            elif name.startswith("weight_hh"):
                p.copy_(torch.eye(H)[torch.randperm(H, generator=g)])
            else:
                p.copy_(ints(H))
    ours = rnnfast.RNN(I, H, nonlinearity="relu", bidirectional=True, backend=backend)
    ours.load_state_dict(ref.state_dict())
    ours = ours.float() if autocast else ours.to(BF16)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    lengths[0] = T
    x, h0, go = ints(T, B, I), ints(2, B, H), ints(T, B, 2 * H)

    def run(module, dtype, ac):
        xx, hh = (t.to(dtype, copy=True).requires_grad_() for t in (x, h0))
        with torch.autocast("cpu", dtype=BF16, enabled=ac):
            out, _ = module(pack_padded_sequence(xx, lengths, enforce_sorted=False) if packed else xx, hh)
        out = out.data if packed else out
        want = (pack_padded_sequence(go, lengths, enforce_sorted=False).data if packed else go).to(out.dtype)
        out.backward(want)
        return [out, xx.grad, hh.grad] + [p.grad for p in module.parameters()]

    want = run(ref, torch.float64, False)
    got = run(ours, torch.float32 if autocast else BF16, autocast)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b.to(a.dtype)), f"tensor {k}: {(a.double() - b).abs().max().item()} off"


@pytest.mark.parametrize("family", list(CELLS))
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-module", "autocast"])
@pytest.mark.parametrize("I, H, B", [(13, 37, 5), (5, 17, 1)], ids=["B5", "B1-odd"])
def test_bf16_cells_no_worse_than_torch(family, autocast, I, H, B, backend):
    _numerics_here(backend)
    _compare_cells(family, backend, I, H, B, (torch.float32, True) if autocast else (BF16, False))


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@pytest.mark.parametrize("family", list(CELLS))
@pytest.mark.parametrize("I, H, B", [(13, 37, 5), (5, 17, 1)], ids=["B5", "B1-odd"])
def test_float16_cells_no_worse_than_torch(family, I, H, B):
    _compare_cells(family, "cpu", I, H, B, (torch.float16, False))


def _compare_cells(family: str, backend: str, I: int, H: int, B: int, low: tuple[torch.dtype, bool]) -> None:  # noqa: E741
    """Four steps of a cell in ``low`` (dtype, under bfloat16 autocast), every output and gradient within
    1.5x of torch.nn's own error against float32 (plus SLACK), with no fallback."""
    ref, ours = _twins(family, backend, I, H)
    lstm = family == "LSTMCell"
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, B, I, generator=g)
    s0 = [torch.randn(B, H, generator=g) for _ in range(2 if lstm else 1)]

    def run(module, dtype, ac):
        module = copy.deepcopy(module).to(dtype)
        x = xs.detach().to(dtype).requires_grad_()
        states = [s.detach().to(dtype).requires_grad_() for s in s0]
        hx, outs = (tuple(states) if lstm else states[0]), []
        with torch.autocast("cpu", dtype=BF16, enabled=ac):
            for t in range(xs.size(0)):
                hx = module(x[t], hx)
                outs.extend(hx if lstm else [hx])
            sum((o.float() * (k + 1)).sum() for k, o in enumerate(outs)).backward()
        return outs + [x.grad, *(s.grad for s in states), *(p.grad for p in module.parameters())]

    want = run(ref, torch.float32, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        got = run(ours, *low)
    theirs = run(ref, *low)
    for k, (g_, t, w) in enumerate(zip(got, theirs, want)):
        assert g_.dtype == t.dtype
        ours_err, torch_err = _max_err(g_, w), _max_err(t, w)
        assert ours_err <= 1.5 * torch_err + SLACK, f"tensor {k}: error {ours_err:.2e}, torch.nn's {torch_err:.2e}"


@needs_fused_loop
@pytest.mark.parametrize("autocast", [False, True], ids=["module", "autocast"])
@pytest.mark.parametrize("T, B", [(1, 1), (1, 2), (2, 1)])
def test_bf16_decode_with_projections(T, B, autocast, monkeypatch):
    """A bfloat16 LSTM stack with proj_size on one or two rows takes the decode path (W_hr after each step,
    its input rounded to bfloat16), within torch.nn's own bfloat16 error of float32 torch.nn."""
    calls = []
    real = rnnfast.cpu._C.decode
    monkeypatch.setattr(rnnfast.cpu._C, "decode", lambda *a: (calls.append(a[4].dtype), real(*a))[1])
    ref, ours = _twins("LSTM", "cpu", 6, 24, num_layers=2, proj_size=5)
    x = torch.randn(T, B, 6)
    state = (torch.randn(2, B, 5), torch.randn(2, B, 24))
    with torch.no_grad():
        want = ref(x, state)
        if autocast:
            with torch.autocast("cpu", dtype=BF16):
                got, theirs = ours(x, state), ref(x, state)
        else:
            low = tuple(s.to(BF16) for s in state)
            got, theirs = ours.to(BF16)(x.to(BF16), low), copy.deepcopy(ref).to(BF16)(x.to(BF16), low)
    assert calls and all(d == BF16 for d in calls)
    for g, t, w in zip([got[0], *got[1]], [theirs[0], *theirs[1]], [want[0], *want[1]]):
        assert g.dtype == t.dtype
        assert _max_err(g, w) <= 1.5 * _max_err(t, w) + SLACK


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
def test_bf16_without_bf16_instructions():
    """CPUs without AVX512-BF16 run bfloat16 on widened float32 copies: the same bounds, checked
    by capping the kernels this machine picks (RNNFAST_CPU_ISA)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from rnnfast import _C
        from parity import Case
        from test_lowp import _compare_lowp
        assert not _C.has_bf16_loop()
        for family in ("LSTM", "GRU", "RNN"):
            for autocast in (False, True):
                _compare_lowp(family, Case("isa", dict(bidirectional=True), I=11, H=37, T=6, B=5,
                                           packed="unsorted"), "cpu", autocast)
        print("ok")
    """)
    env = dict(os.environ, RNNFAST_CPU_ISA="avx512")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


_BACKWARD_UNDER_AUTOCAST = """
import torch, rnnfast
torch.manual_seed(0)
for kind, kwargs in (("LSTM", dict(proj_size=4)), ("GRU", {}), ("RNN", {})):
    m = getattr(rnnfast, kind)(6, 10, backend="cpu", **kwargs)
    x = torch.randn(5, 3, 6, requires_grad=True)

    def grads(inside, create_graph):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)[0]
            if inside:
                return torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y), create_graph=create_graph)
        return torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y), create_graph=create_graph)

    for create_graph in (False, True):  # True: the double-backward path (the reference loop, differentiable)
        inside, after = grads(True, create_graph), grads(False, create_graph)
        assert all(torch.equal(a, b) for a, b in zip(inside, after)), (kind, create_graph)
    # the operators' path (torch.func; torch.compile's too): the same inside and after the block
    params = {k: v.detach() for k, v in m.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, pull = torch.func.vjp(lambda p: torch.func.functional_call(m, p, (x.detach(),))[0], params)
        inside = pull(torch.ones_like(y))[0]
    after = pull(torch.ones_like(y))[0]
    assert all(torch.equal(inside[k], after[k]) for k in params), kind
print("ok")
"""


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
def test_backward_under_autocast_keeps_the_forward_dtypes(isa):
    """A backward called inside the autocast block gives the gradients of one called after it, through the
    modules' autograd node, through the operators (torch.func) and with create_graph: the products run in the
    dtypes the forward chose, also where ATen's GEMMs run them (the stepwise loop: proj_size, or CPUs without
    AVX2+FMA; the reference loop of a double backward), where they had taken autocast's bfloat16."""
    env = dict(os.environ)
    env.pop("RNNFAST_CPU_ISA", None)
    if isa != "native":
        env["RNNFAST_CPU_ISA"] = isa
    result = subprocess.run([sys.executable, "-c", _BACKWARD_UNDER_AUTOCAST], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif("cpu" not in rnnfast.available_backends() or not rnnfast._C.has_bf16_loop(),
                    reason="needs the fused bfloat16 loop (AVX512-BF16)")
def test_bf16_below_amx():
    """CPUs with AVX512-BF16 but no AMX run the bfloat16 products on vdpbf16ps: the same bounds and exact
    sums, checked by capping the kernels this machine picks (RNNFAST_CPU_ISA=avx512bf16)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from rnnfast import _C
        from parity import Case
        from test_lowp import _compare_lowp, test_bf16_gradients_exact_on_small_integers
        assert _C.product_isa("bfloat16") == "AVX512-BF16 vdpbf16ps", _C.product_isa("bfloat16")
        for family in ("LSTM", "GRU", "RNN"):
            for autocast in (False, True):
                _compare_lowp(family, Case("isa", dict(bidirectional=True), I=11, H=37, T=6, B=5,
                                           packed="unsorted"), "cpu", autocast)
        test_bf16_gradients_exact_on_small_integers(True, False, 12, 37, 64, 96, "cpu")
        print("ok")
    """)
    env = dict(os.environ, RNNFAST_CPU_ISA="avx512bf16")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@pytest.mark.skipif(not {"amx_tile", "amx_bf16"} <= _cpu_flags(), reason="this CPU has no AMX-BF16 (Linux's flags)")
@pytest.mark.skipif("RNNFAST_CPU_ISA" in os.environ, reason="RNNFAST_CPU_ISA caps the instructions rnnfast uses")
def test_amx_runs_where_the_cpu_has_it():
    """Where Linux reports AMX tiles, the bfloat16 products run on them (the tests above then check that path)."""
    assert rnnfast._C.product_isa("bfloat16") == "AMX tdpbf16ps"
    assert rnnfast._C.peak_gflops("bfloat16", 0.02) > rnnfast._C.peak_gflops("float32", 0.02)


def _bf16_loop() -> bool:
    return "cpu" in rnnfast.available_backends() and rnnfast.cpu._BF16_LOOP


needs_bf16_loop = pytest.mark.skipif(not _bf16_loop(), reason="needs the fused bfloat16 loop (AVX512-BF16)")


@needs_bf16_loop
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("packed, reverse", [(False, False), (True, True)], ids=["padded", "packed-reverse"])
def test_float32_states_beside_bf16_input_run_the_bf16_loop(mode, packed, reverse):
    """layer_fwd and decode with bfloat16 input and float32 states (autocast's call) compute what the all-bfloat16
    call computes, the states kept float32 in both, and return it unrounded in float32."""
    from rnnfast.backend import GATES, MODE_ID

    g = torch.Generator().manual_seed(0)
    T, B, I, H, G = 7, 5, 13, 17, GATES[mode]
    x = torch.randn(T, B, I, generator=g).to(BF16)
    h0, c0 = (torch.randn(B, H, generator=g).to(BF16) for _ in range(2))
    c0 = c0 if mode == "LSTM" else None
    w = [torch.randn(s, generator=g) * 0.3 for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))]
    bs = torch.tensor([5, 5, 4, 3, 3, 2, 1]) if packed else None
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    for save in (False, True):
        low = torch.ops.rnnfast.layer_fwd(MODE_ID[mode], x, bs, h0, c0, *w, None, reverse, save)
        mixed = torch.ops.rnnfast.layer_fwd(MODE_ID[mode], x, bs, f32(h0), f32(c0), *w, None, reverse, save)
        for k, (a, b) in enumerate(zip(low[:3], mixed[:3])):
            if a.numel():
                assert b.dtype == torch.float32, f"output {k}: {b.dtype}"
                assert torch.equal(b.to(BF16), a), f"output {k} differs from the bfloat16 loop's"
    if not packed and not reverse:  # decode: a two-layer stack, one step
        ws = w + [torch.randn(s, generator=g) * 0.3 for s in ((G * H, H), (G * H, H), (G * H,), (G * H,))]
        stack = lambda t: None if t is None else torch.stack([t[:2], t[:2]])  # noqa: E731
        low = rnnfast.cpu._C.decode(MODE_ID[mode], ws, 2, True, x[:1, :2], stack(h0), stack(c0))
        mixed = rnnfast.cpu._C.decode(MODE_ID[mode], ws, 2, True, x[:1, :2], f32(stack(h0)), f32(stack(c0)))
        for k, (a, b) in enumerate(zip(low, mixed)):
            if a is not None:
                assert b.dtype == torch.float32 and torch.equal(b.to(BF16), a), f"decode output {k}"


@needs_bf16_loop
@pytest.mark.parametrize("family, kwargs, packed, T, B", [
    ("GRU", dict(num_layers=2, bidirectional=True), False, 20, 9),
    ("GRU", dict(num_layers=2), False, 1, 1),  # the decode path
    ("LSTM", dict(bidirectional=True), True, 6, 4),
    ("GRU", {}, True, 6, 4),
    ("LSTMCell", {}, False, 1, 3),
    ("GRUCell", {}, False, 1, 3),
], ids=["gru-L2-bidir", "gru-decode", "lstm-packed", "gru-packed", "lstmcell", "grucell"])
def test_autocast_float32_states_take_bf16_products(family, kwargs, packed, T, B, monkeypatch):
    """Under CPU autocast, GRU, packed LSTM and the LSTM and GRU cells with float32 states run their
    products in bfloat16 (every operator call gets bfloat16 input beside float32 states) and return
    float32, as torch.nn does."""
    calls = []
    real_decode = rnnfast.cpu._C.decode

    def decode(mode, weights, layers, bias, x, h0, c0):
        calls.append((x.dtype, h0.dtype))
        return real_decode(mode, weights, layers, bias, x, h0, c0)

    monkeypatch.setattr(rnnfast.cpu._C, "decode", decode)
    cell = family.endswith("Cell")
    module = getattr(rnnfast, family)(7, 9, backend="cpu", **kwargs)
    x = torch.randn(B, 7) if cell else torch.randn(T, B, 7)
    arg = pack_padded_sequence(x, [T] + [T - 1] * (B - 1)) if packed else x
    with torch.autocast("cpu", dtype=BF16), torch.set_grad_enabled(T * B > 1), RecordOps() as ops:
        result = module(arg)
    # operator calls, the eager autograd entry's included, as the dispatcher sees them
    calls += [(args[1].dtype, args[3].dtype) for func, args, _, _ in ops.calls if func._opname == "layer_fwd"]
    assert calls and all(c == (BF16, torch.float32) for c in calls), calls
    assert set(_dtypes(result)) == {torch.float32}
