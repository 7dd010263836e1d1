"""What is specific to the ``cpu`` backend: its inference decode path and weight
cache, torch.compile through its operators, and a clear fallback when the
extension is broken. (Parity with torch.nn runs in test_lstm/gru/rnn.py.)"""

import subprocess
import sys
import textwrap
import pytest
import torch

import rnnfast
from rnnfast.backend import get_backend

pytestmark = pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")

TORCH = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}


def twins(family: str, *args, dtype=torch.float32, **kwargs):
    """A torch.nn layer and its rnnfast cpu twin with the same weights."""
    torch.manual_seed(0)
    ref = TORCH[family](*args, **kwargs).to(dtype)
    ours = getattr(rnnfast, family)(*args, backend="cpu", **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_same(got, want, dtype=torch.float32):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    else:
        for g, w in zip(got, want):
            assert_same(g, w, dtype)


@pytest.fixture
def decode_calls(monkeypatch):
    """Count the calls that take the fused decode path."""
    calls = []
    real = rnnfast.cpu._C.decode

    def spy(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(rnnfast.cpu._C, "decode", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "family, kwargs",
    [("LSTM", {}), ("LSTM", dict(num_layers=3)), ("GRU", dict(num_layers=2)), ("GRU", dict(bias=False)),
     ("RNN", dict(num_layers=2)), ("RNN", dict(nonlinearity="relu", bias=False))],
    ids=["lstm", "lstm-L3", "gru-L2", "gru-nobias", "rnn-L2", "relu-nobias"],
)
@pytest.mark.parametrize("T, B", [(1, 1), (3, 4)], ids=["T1B1", "T3B4"])
def test_decode_path_matches_torch(family, kwargs, T, B, dtype, decode_calls):
    ref, ours = twins(family, 19, 40, dtype=dtype, **kwargs)
    x = torch.randn(T, B, 19, dtype=dtype)
    state_ref = state_ours = None
    with torch.no_grad():
        for _ in range(3):  # carry the state across calls, as a decoder does
            want, state_ref = ref(x, state_ref)
            got, state_ours = ours(x, state_ours)
            assert_same(got, want, dtype)
            assert_same(state_ours, state_ref, dtype)
    assert len(decode_calls) == 3


def test_decode_path_not_taken_with_grad(decode_calls):
    _, ours = twins("LSTM", 8, 16)
    out, _ = ours(torch.randn(1, 1, 8))
    out.sum().backward()
    assert decode_calls == []
    assert ours.weight_hh_l0.grad is not None


def test_decode_cache_follows_weight_changes(decode_calls):
    ref, ours = twins("LSTM", 12, 24, num_layers=2)
    x = torch.randn(1, 2, 12)

    def check():
        with torch.no_grad():
            assert_same(ours(x), ref(x))

    check()
    with torch.no_grad():  # in-place edit of one weight
        for m in (ref, ours):
            m.weight_hh_l1.mul_(0.5)
    check()
    other = torch.nn.LSTM(12, 24, num_layers=2)  # load_state_dict copies in place
    ref.load_state_dict(other.state_dict())
    ours.load_state_dict(other.state_dict())
    check()
    seq = torch.randn(3, 2, 12)
    for m in (ref, ours):  # an optimizer step after a training step
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(seq)[0].square().sum().backward()
        opt.step()
    check()
    for m in (ref, ours):  # a parameter replaced by a new tensor
        m.bias_ih_l0 = torch.nn.Parameter(torch.randn(96))
    ours.bias_ih_l0.data.copy_(ref.bias_ih_l0)
    check()
    assert len(decode_calls) == 5


class Tagger(torch.nn.Module):
    """A small sequence model using rnnfast layers, for torch.compile."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 16)
        self.lstm = rnnfast.LSTM(16, 20, num_layers=2, bidirectional=True, backend="cpu")
        self.gru = rnnfast.GRU(40, 12, backend="cpu")
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        y, _ = self.lstm(torch.tanh(self.embed(x)))
        y, h = self.gru(y)
        return self.head(y), h


@torch._dynamo.config.patch(allow_rnn=True)  # dynamo skips torch.nn.RNNBase subclasses without it
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = Tagger()
    x = torch.randn(7, 3, 6, requires_grad=True)

    def run(fn):
        out, h = fn(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + h.square().sum()
        grads = torch.autograd.grad(loss, [x, *model.parameters()])
        return out.detach(), h.detach(), grads

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    want = run(model)
    got = run(compiled)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    assert_same(got[2], want[2])
    with torch.no_grad():
        assert_same(compiled(x)[0], model(x)[0])


def test_unsupported_calls_name_the_reason():
    cpu = get_backend("cpu")
    spec = rnnfast.RNNSpec("LSTM", 4, 8)
    assert "bfloat16" in cpu.unsupported_reason(spec, torch.empty(0, dtype=torch.bfloat16), False)
    assert "meta" in cpu.unsupported_reason(spec, torch.empty(0, device="meta"), False)
    assert cpu.unsupported_reason(spec, torch.empty(0, dtype=torch.float64), True) is None


def test_broken_extension_falls_back_with_a_clear_message():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["rnnfast._C"] = None  # what a missing or unloadable extension looks like
        import torch, rnnfast
        from rnnfast.backend import BackendFallbackWarning, get_backend
        print("REASON", get_backend("cpu").unavailable_reason())
        print("AVAILABLE", rnnfast.available_backends())
        torch.manual_seed(0)
        ref = torch.nn.GRU(5, 7)
        for name in ("cpu", "auto"):
            ours = rnnfast.GRU(5, 7, backend=name)
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(4, 2, 5)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                same = torch.allclose(ours(x)[0], ref(x)[0])
            print("RUN", name, same, [str(w.message) for w in caught if w.category is BackendFallbackWarning])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = {line.split(" ")[0] + (" " + line.split(" ")[1] if line.startswith("RUN") else ""): line
           for line in result.stdout.splitlines()}
    assert "rnnfast.cpu failed to load" in out["REASON"] and "rnnfast._C" in out["REASON"]
    assert "'cpu'" not in out["AVAILABLE"]
    assert out["RUN auto"] == "RUN auto True []"  # auto falls back silently
    assert out["RUN cpu"].startswith("RUN cpu True")  # explicit cpu warns, naming the load error
    assert "falling back to 'reference'" in out["RUN cpu"] and "rnnfast.cpu failed to load" in out["RUN cpu"]


@pytest.mark.parametrize("family, H", [("LSTM", 130), ("GRU", 150), ("RNN", 260)])
def test_large_steps_take_the_threaded_gemm_path(family, H):
    """Steps with B * G * H * H above 2**22 multiply-adds use the threaded GEMM, not the GEMV kernel."""
    from parity import Case, check_layer

    check_layer(family, Case("big", dict(bidirectional=True), I=8, H=H, T=3, B=64, packed="unsorted"), "cpu")
