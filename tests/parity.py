"""Shared test machinery, the one home of the suite's helpers: the case grids of
every layer family, torch.nn/rnnfast twin modules, and the parity checks that run
a torch.nn module and its rnnfast twin on the same inputs and compare outputs,
final states and every gradient.

``test_parity.py`` runs :data:`LAYER_CASES` / :func:`cell_cases` through
:func:`check_layer` / :func:`check_cell`; the ``backend`` fixture (conftest)
makes every registered backend run the same grid.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnfast
from rnnfast.backend import BackendFallbackWarning, RNNSpec, get_backend

FAMILIES = ("LSTM", "GRU", "RNN")
CELL_FAMILIES = ("LSTMCell", "GRUCell", "RNNCell")
TORCH_CLASSES = {name: getattr(torch.nn, name) for name in FAMILIES}
CELL_CLASSES = {name: getattr(torch.nn, name) for name in CELL_FAMILIES}

# (atol, rtol) against torch.nn in the same dtype; low precision against float32 torch.nn
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclass
class Case:
    """One call of a layer: constructor arguments plus the shape of the input."""

    id: str
    kwargs: dict = field(default_factory=dict)
    I: int = 13
    H: int = 37
    T: int = 5
    B: int = 3
    batch_first: bool = False
    unbatched: bool = False
    with_state: bool = True
    packed: Optional[str] = None  # None, "sorted" or "unsorted"
    training: bool = False
    quick: bool = True  # also run on interpreted (slow) backends

    def param(self):
        marks = () if self.quick else (pytest.mark.slow,)
        return pytest.param(self, id=self.id, marks=marks)


# cell cases every family runs (RNNCell adds its relu variant)
CELL_CASES = [
    Case("cell", B=4),
    Case("cell-B1", B=1),
    Case("cell-unbatched", unbatched=True),
    Case("cell-no-state", with_state=False),
    Case("cell-no-bias", dict(bias=False)),
]


def _layer_cases(*extra: Case) -> list[Case]:
    """The cases every layer family runs, then the family's own."""
    return [
        Case("base"),
        Case("T1-B1", T=1, B=1),
        Case("no-state", with_state=False),
        Case("batch-first", batch_first=True),
        Case("unbatched", unbatched=True),
        Case("no-bias", dict(bias=False)),
        Case("bidir", dict(bidirectional=True)),
        Case("dropout-train", dict(num_layers=3, dropout=0.4), training=True),
        Case("packed-sorted", packed="sorted", B=4, T=7),
        Case("wide", I=64, H=130, T=4, B=9, quick=False),
        *extra,
    ]


LAYER_CASES = {
    "LSTM": _layer_cases(
        Case("T63", T=63, B=2, quick=False),
        Case("unbatched-no-state", unbatched=True, with_state=False, batch_first=True),
        Case("layers2", dict(num_layers=2)),
        Case("layers3-bidir", dict(num_layers=3, bidirectional=True), quick=False),
        Case("proj", dict(proj_size=11)),
        Case("proj-bidir-layers2", dict(proj_size=5, num_layers=2, bidirectional=True)),
        Case("dropout-eval", dict(num_layers=2, dropout=0.4), training=False, quick=False),
        Case("packed-unsorted", packed="unsorted", B=5, T=6),
        Case("packed-bidir-layers2", dict(bidirectional=True, num_layers=2), packed="unsorted", B=4, T=6),
        Case("packed-proj-dropout", dict(proj_size=7, num_layers=2, dropout=0.3), packed="unsorted", training=True,
             quick=False),
        Case("packed-batch-first-no-state", packed="unsorted", batch_first=True, with_state=False),
    ),
    "GRU": _layer_cases(
        Case("T63", T=63, B=2, quick=False),
        Case("layers2", dict(num_layers=2)),
        Case("layers3-bidir-no-bias", dict(num_layers=3, bidirectional=True, bias=False), quick=False),
        Case("packed-unsorted", packed="unsorted", B=5, T=6),
        Case("packed-bidir-layers2", dict(bidirectional=True, num_layers=2), packed="unsorted", B=4, T=6),
        Case("packed-batch-first-no-state", packed="unsorted", batch_first=True, with_state=False, quick=False),
    ),
    "RNN": _layer_cases(
        Case("relu", dict(nonlinearity="relu")),
        Case("T63-relu", dict(nonlinearity="relu"), T=63, B=2, quick=False),
        Case("layers2-relu", dict(num_layers=2, nonlinearity="relu")),
        Case("packed-unsorted-bidir-relu", dict(bidirectional=True, nonlinearity="relu"), packed="unsorted", B=5,
             T=6),
    ),
}

# float64 gradcheck cases: hundreds of forward calls each, so tiny sizes
GRADCHECK_CASES = {
    "LSTM": [Case("gc", dict(num_layers=2, bidirectional=True), I=3, H=4, T=3, B=2),
             Case("gc-proj", dict(proj_size=2), I=3, H=4, T=3, B=2)],
    "GRU": [Case("gc", dict(num_layers=2, bidirectional=True), I=3, H=4, T=3, B=2)],
    "RNN": [Case("gc-tanh", dict(num_layers=2, bidirectional=True), I=3, H=4, T=3, B=2),
            Case("gc-relu", dict(nonlinearity="relu"), I=3, H=4, T=3, B=2)],
}


def cell_cases(family: str) -> list[Case]:
    """The cell cases of ``family`` (``"RNNCell"`` adds its relu variant)."""
    extra = [Case("cell-relu", dict(nonlinearity="relu"), B=4)] if family == "RNNCell" else []
    return CELL_CASES + extra


needs_fused_loop = pytest.mark.skipif(
    "cpu" not in rnnfast.available_backends() or not rnnfast.cpu._FUSED_LOOP,
    reason="needs the cpu backend's fused loop (AVX2+FMA; this CPU, or RNNFAST_CPU_ISA, has neither)",
)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to n inside the block, and put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mode_of(family: str, kwargs: dict) -> str:
    """The backend mode (one of ``rnnfast.backend.MODES``) of a layer or cell family with these arguments."""
    base = family.removesuffix("Cell")
    if base == "RNN":
        return "RNN_RELU" if kwargs.get("nonlinearity") == "relu" else "RNN_TANH"
    return base


def twins(name: str, backend: str, *args, dtype=None, device="cpu", **kwargs):
    """``torch.nn.<name>`` and ``rnnfast.<name>(backend=...)`` built from the same
    arguments, with the same weights (the torch.nn module's, seeded)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*args, **kwargs).to(device=device, dtype=dtype)
    ours = getattr(rnnfast, name)(*args, backend=backend, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _lengths(case: Case) -> list[int]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, case.T + 1, (case.B,), generator=g).tolist()
    lengths[case.B // 2] = case.T  # the longest sequence fills T
    if case.packed == "sorted":
        lengths.sort(reverse=True)
    return lengths


def _assert_close(name: str, got, want, dtype, scaled: bool = False) -> None:
    """Within dtype's tolerance of want; scaled: atol relative to want's largest magnitude (sums of many terms,
    whose small elements are differences of large ones)."""
    atol, rtol = TOLERANCES[dtype]
    assert got is not None, f"{name}: missing (torch.nn gives a tensor)"
    if scaled:
        atol *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.to(want.dtype), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def flat(obj) -> list[torch.Tensor]:
    """The tensors of a layer's or cell's output, in order (a PackedSequence gives its data)."""
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for o in obj for t in flat(o)]


def run_layer(module: torch.nn.Module, case: Case, inputs: dict, dtype, device, seed: int = 123):
    """Forward and backward; returns (outputs, grads by name)."""
    x = inputs["x"].to(device=device, dtype=dtype).detach().requires_grad_()
    states = [s.to(device=device, dtype=dtype).detach().requires_grad_() for s in inputs["states"]]
    arg = x
    if case.packed:
        arg = pack_padded_sequence(x, torch.tensor(inputs["lengths"]), batch_first=case.batch_first,
                                   enforce_sorted=case.packed == "sorted")
    hx = None
    if states:
        hx = tuple(states) if len(states) == 2 else states[0]
    torch.manual_seed(seed)  # same dropout masks for both modules
    # torch's native kernels rather than cuDNN, which refuses backward in eval mode
    with torch.backends.cudnn.flags(enabled=False):
        out = module(arg, hx)
        tensors = flat(out)
        g = torch.Generator().manual_seed(7)
        loss = sum((t.float() * torch.randn(t.shape, generator=g).to(device)).sum() for t in tensors)
        loss.backward()
    grads = {"x": x.grad, **{f"state{k}": s.grad for k, s in enumerate(states)}}
    grads.update({f"param:{n}": p.grad for n, p in module.named_parameters()})
    return tensors, grads


def make_inputs(case: Case, state_sizes: list[int], lead: int) -> dict:
    """Float64 input, initial states (one per size in ``state_sizes``) and packed lengths."""
    g = torch.Generator().manual_seed(0)
    shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    if case.unbatched:
        shape = (case.T, case.I)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    states = []
    if case.with_state:
        for size in state_sizes:
            s_shape = (lead, size) if case.unbatched else (lead, case.B, size)
            states.append(torch.randn(s_shape, generator=g, dtype=torch.float64))
    return {"x": x, "states": states, "lengths": _lengths(case) if case.packed else None}


def require_support(backend: str, spec: RNNSpec, dtype, device, packed: bool) -> None:
    """Skip, naming the reason, a call that ``backend`` declares it cannot run.

    Calls it accepts must then really run on it: the parity helpers turn a
    fallback warning into an error, so a fallback never passes as parity.
    """
    probe = torch.empty(0, dtype=dtype, device=device)
    why = get_backend(backend).unsupported_reason(spec, probe, packed)
    if why is not None:
        pytest.skip(f"{backend} does not support this call: {why}")


def check_layer(family: str, case: Case, backend: str, dtype=torch.float32, device="cpu", exact: bool = False) -> None:
    """rnnfast.<family>(backend=...) against torch.nn.<family>: outputs, states, gradients. exact: against
    torch.nn in float64, with atol scaled to each tensor's magnitude: for long sums, where two float32 orders
    of summation may differ by more than 1e-5 in the gradients' small elements (torch.nn's own float32 error
    does too)."""
    mode = mode_of(family, case.kwargs)
    spec_kwargs = {k: v for k, v in case.kwargs.items() if k != "nonlinearity"}
    require_support(backend, RNNSpec(mode, case.I, case.H, training=case.training, **spec_kwargs), dtype, device,
                    case.packed is not None)
    kwargs = dict(case.kwargs, batch_first=case.batch_first)
    ref_dtype = torch.float64 if exact else torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref, ours = twins(family, backend, case.I, case.H, dtype=ref_dtype, device=device, **kwargs)
    ours.to(dtype)
    ref.train(case.training)
    ours.train(case.training)
    D = 2 if kwargs.get("bidirectional") else 1
    state_sizes = [kwargs.get("proj_size") or case.H] + ([case.H] if family == "LSTM" else [])
    inputs = make_inputs(case, state_sizes, kwargs.get("num_layers", 1) * D)
    want, want_g = run_layer(ref, case, inputs, ref_dtype, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        got, got_g = run_layer(ours, case, inputs, dtype, device)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"output {k}: shape {tuple(a.shape)} != torch's {tuple(b.shape)}"
        _assert_close(f"output {k}", a, b, dtype, exact)
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        _assert_close(f"grad {name}", got_g[name], want_g[name], dtype, exact)


def check_cell(family: str, case: Case, backend: str, dtype=torch.float32, device="cpu", steps: int = 3) -> None:
    """rnnfast.<family>Cell against torch.nn's over a few chained steps, with gradients."""
    spec = RNNSpec(mode_of(family, case.kwargs), case.I, case.H, bias=case.kwargs.get("bias", True))
    require_support(backend, spec, dtype, device, False)
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ref, ours = twins(family, backend, case.I, case.H, dtype=ref_dtype, device=device, **case.kwargs)
    ours.to(dtype)
    lstm = family == "LSTMCell"
    g = torch.Generator().manual_seed(0)
    lead = () if case.unbatched else (case.B,)
    xs = torch.randn((steps,) + lead + (case.I,), generator=g, dtype=torch.float64)
    states = [torch.randn(lead + (case.H,), generator=g, dtype=torch.float64) for _ in range(2 if lstm else 1)]

    def run(module, dt):
        x = xs.to(device=device, dtype=dt).requires_grad_()
        s0 = [s.to(device=device, dtype=dt).requires_grad_() for s in states] if case.with_state else []
        hx = (tuple(s0) if lstm else s0[0]) if s0 else None
        outs = []
        for t in range(steps):
            hx = module(x[t], hx)
            outs.extend(flat(hx))
        gg = torch.Generator().manual_seed(7)
        sum((o.float() * torch.randn(o.shape, generator=gg).to(device)).sum() for o in outs).backward()
        grads = {"x": x.grad, **{f"state{k}": s.grad for k, s in enumerate(s0)}}
        grads.update({f"param:{n}": p.grad for n, p in module.named_parameters()})
        return outs, grads

    want, want_g = run(ref, ref_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        got, got_g = run(ours, dtype)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        _assert_close(f"step output {k}", a, b, dtype)
    for name in want_g:
        _assert_close(f"grad {name}", got_g[name], want_g[name], dtype)


def gradcheck_layer(family: str, case: Case, backend: str) -> None:
    """torch.autograd.gradcheck in float64 on the rnnfast layer (input, states, weights)."""
    torch.manual_seed(0)
    kwargs = dict(case.kwargs, batch_first=case.batch_first)
    mod = getattr(rnnfast, family)(case.I, case.H, backend=backend, **kwargs).double()
    names, params = zip(*mod.named_parameters())
    D = 2 if kwargs.get("bidirectional") else 1
    lead = kwargs.get("num_layers", 1) * D
    x = torch.randn(case.T, case.B, case.I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(lead, case.B, kwargs.get("proj_size") or case.H, dtype=torch.float64, requires_grad=True)
    extra = [torch.randn(lead, case.B, case.H, dtype=torch.float64, requires_grad=True)] if family == "LSTM" else []

    def fn(x, h0, *rest):
        states, ps = rest[: len(extra)], rest[len(extra):]
        fresh = copy.deepcopy(mod)
        state_dict = dict(zip(names, ps))
        out = torch.func.functional_call(fresh, state_dict, (x, (h0, *states) if extra else h0))
        return tuple(flat(out))

    assert torch.autograd.gradcheck(fn, (x, h0, *extra, *params), atol=1e-6, rtol=1e-5)
