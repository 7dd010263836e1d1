"""torch.compile of models with rnnfast layers and cells: outputs and gradients equal
to eager on every backend usable here, in one graph where torch.nn's compile in one
(dynamo's ``allow_rnn``), and with graph breaks around the layers without it."""

import pytest
import torch
from torch import nn

import rnnfast

from conftest import INTERPRETED, backend_device


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
    if backend in INTERPRETED:
        pytest.skip("dynamo traces into the Triton interpreter's numpy emulation and fails there (GPU only)")
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
@torch._dynamo.config.patch(allow_rnn=True)
def test_inductor_keeps_the_cpu_operators():
    """Inductor compiles the graph around rnnfast's operators, which stay calls to the C++ kernels."""
    model, x = tagger("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(run(compiled, model, x), run(model, model, x), atol=1e-5, rtol=1e-5)


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


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
@torch._dynamo.config.patch(allow_rnn=True)
def test_compile_under_cpu_autocast():
    """The fake kernels give the dtypes the C++ ones do for bfloat16 input beside float32 states, and
    compile matches eager."""
    torch.manual_seed(0)
    model = rnnfast.convert(StatesModel(), backend="cpu")
    x = torch.randn(7, 3, 6, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(compiled, model, x), run(model, model, x)
    assert [t.dtype for t in got[:2]] == [t.dtype for t in want[:2]] == [torch.float32] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
