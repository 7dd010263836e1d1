"""torch.compile of models with rnnfast layers and cells: outputs and gradients equal
to eager on every backend usable here, in one graph where torch.nn's compile in one
(dynamo's ``allow_rnn``), and with graph breaks around the layers without it."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import rnnfast

from conftest import RecordOps, backend_device


class Tagger(nn.Module):
    """A small sequence model: a stacked bidirectional LSTM, a GRU and a cell between linear layers."""

    def __init__(self, H: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, H, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(2 * H, H)
        self.cell = nn.LSTMCell(H, H)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        y, _ = self.lstm(torch.tanh(self.embed(x)))
        y, h = self.gru(y)
        hc, _ = self.cell(y[-1], (h[0], h[0]))
        return self.head(y), hc


def run(fn, model, x):
    """Outputs and every gradient of a weighted loss."""
    out, hc = fn(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum() + hc.square().sum()
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return out.detach(), hc.detach(), grads


def tagger(backend):
    torch.manual_seed(0)
    device = backend_device(backend)
    model = rnnfast.convert(Tagger(), backend=backend).to(device)
    T, B = (3, 2) if backend == "reference" else (7, 3)  # the reference's time loop unrolls into the graph
    return model, torch.randn(T, B, 6, device=device, requires_grad=True)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks"])
def test_compile_matches_eager(backend, fullgraph):
    if not fullgraph and backend == "reference":
        pytest.skip("graph breaks: dynamo compiles the reference's time loop once per layer frame (a minute); "
                    "the cpu backend covers the default configuration")
    model, x = tagger(backend)
    torch._dynamo.reset()
    # without allow_rnn, dynamo leaves every torch.nn.RNNBase (and so every rnnfast layer) to eager
    with torch._dynamo.config.patch(allow_rnn=fullgraph):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
        got = run(compiled, model, x)
        with torch.no_grad():
            inference = compiled(x)[0]
    want = run(model, model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(inference, model(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
def test_compiled_autograd_matches_eager():
    """An eager forward whose backward runs under compiled autograd: the cpu backend's eager
    training calls leave C++ autograd nodes (rnnfast._C.layer_fwd_eager), traced with the
    gradients of plain eager."""
    torch.manual_seed(0)
    gru, cell = rnnfast.GRU(3, 4, backend="cpu"), rnnfast.LSTMCell(4, 4, backend="cpu")
    x = torch.randn(5, 2, 3, requires_grad=True)
    params = [x, *gru.parameters(), *cell.parameters()]
    y, h = gru(x)
    loss = y.square().sum() + cell(y[-1], (h[0], h[0]))[1].square().sum()
    want = torch.autograd.grad(loss, params, retain_graph=True)
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    torch.testing.assert_close(tuple(p.grad for p in params), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@torch._dynamo.config.patch(allow_rnn=True)
def test_inductor_keeps_the_cpu_operators():
    """Inductor compiles the graph around rnnfast's operators, which stay calls to the C++ kernels."""
    model, x = tagger("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(run(compiled, model, x), run(model, model, x), atol=1e-5, rtol=1e-5)


# the operator calls that layers make: every mode, projection, two directions, packed input,
# float64, bfloat16 and float16 modules and autocast, with and without gradients, cells
FAKE_CASES = {
    "lstm": lambda: nn.LSTM(5, 7, num_layers=2),
    "lstm-proj-bi": lambda: nn.LSTM(5, 7, proj_size=3, bidirectional=True),
    "gru-bi": lambda: nn.GRU(5, 7, bidirectional=True),
    "rnn-relu-nobias": lambda: nn.RNN(5, 7, nonlinearity="relu", bias=False),
    "lstm-cell": lambda: nn.LSTMCell(5, 7),
    "gru-cell": lambda: nn.GRUCell(5, 7),
}


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16", "autocast"])
@pytest.mark.parametrize("name", FAKE_CASES)
def test_fake_kernels_match_the_operators(name, dtype, packed, grad, monkeypatch):
    """The fake kernels that torch.compile traces with give every output of the real operators'
    calls the same shape and dtype."""
    cell = name.endswith("cell")
    if cell and packed:
        pytest.skip("cells take no packed input")
    if packed and not grad:  # eager, these run _C.layer_packed (no operator); compiled, the operators here
        monkeypatch.setattr(rnnfast.cpu, "_eager", lambda: False)
    torch.manual_seed(0)
    model = rnnfast.convert(FAKE_CASES[name](), backend="cpu")
    if dtype in ("float64", "bfloat16", "float16"):
        model = model.to(getattr(torch, dtype))
    # T = 20, and B = 9 for cells: past the decode path (not an operator) for float64 too
    x = torch.randn((9, 5) if cell else (20, 3, 5), dtype=next(model.parameters()).dtype)
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([20, 4, 1]), enforce_sorted=False)
    recorder = RecordOps()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"), recorder:
        with torch.set_grad_enabled(grad):
            leaves = [t for t in torch.utils._pytree.tree_leaves(model(x)) if t.requires_grad]
            if grad:
                sum(t.float().sum() for t in leaves).backward()
    assert recorder.calls, "no rnnfast operator ran"
    for func, args, kwargs, real in recorder.calls:
        with torch._subclasses.fake_tensor.FakeTensorMode() as fake_mode:
            fake_args, fake_kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, fake_mode.from_tensor, (args, kwargs))
            fake = func(*fake_args, **fake_kwargs)
        for k, (got, want) in enumerate(zip(torch.utils._pytree.tree_leaves(fake),
                                            torch.utils._pytree.tree_leaves(real), strict=True)):
            assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype), f"{func} output {k}"


FRESH = """
import sys, torch, rnnfast
torch._dynamo.config.allow_rnn = True
model = rnnfast.GRU(4, 6, backend=sys.argv[1])
x = torch.randn(2, 3, 4)
torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x)[0], model(x)[0])
"""


def test_compile_is_the_first_call(backend):
    """In a fresh process the first call of a module can be a compiled one: the backends load as the
    module is made, not inside Dynamo's trace (which cannot import)."""
    env = {**os.environ, "RNNFAST_POISON": "0"}
    proc = subprocess.run([sys.executable, "-c", FRESH, backend], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


class StatesModel(nn.Module):
    """A stacked bidirectional GRU and a GRU cell on float32 states: under CPU autocast their products run
    in bfloat16 and their updates and outputs in float32."""

    def __init__(self, H: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(6, H, num_layers=2, bidirectional=True)
        self.cell = nn.GRUCell(2 * H, H)

    def forward(self, x):
        y, h = self.gru(x, x.new_zeros(4, x.size(1), self.cell.hidden_size))
        return y, self.cell(y[-1], h[-1])


class StackedStates(nn.Module):
    """An LSTM whose (h_n, c_n) come back as one tensor, as run reads a model's states: under CPU autocast
    its padded input is cast whole, outputs and states in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 10, num_layers=2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return y, torch.stack((h, c))


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@torch._dynamo.config.patch(allow_rnn=True)
@pytest.mark.parametrize("make, dtype", [(StatesModel, torch.float32), (StackedStates, torch.bfloat16)],
                         ids=["float32-states", "lstm-cast-whole"])
def test_compile_under_cpu_autocast(make, dtype):
    """The fake kernels give the dtypes the C++ ones do for bfloat16 input beside float32 states, the
    autocast rules trace in one graph (oneDNN's availability read at import), and compile matches eager."""
    torch.manual_seed(0)
    model = rnnfast.convert(make(), backend="cpu")
    x = torch.randn(7, 3, 6, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(compiled, model, x), run(model, model, x)
    assert [t.dtype for t in got[:2]] == [t.dtype for t in want[:2]] == [dtype] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
