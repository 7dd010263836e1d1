"""What is specific to the ``cuda`` backend (rnnfast._cuda): on any machine, its
availability reason, its device/dtype checks, the decode choice and how ``auto``
reaches it; on a GPU, the parity grid in float16/bfloat16 (float32/float64 run in
test_parity.py like every backend), the decode path against torch.nn, its
weight cache, and the operators' argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rnnfast
from parity import LAYER_CASES, Case, check_cell, check_layer
from rnnfast import backend as registry
from rnnfast.backend import MODE_ID, Backend, BackendFallbackWarning, RNNSpec, get_backend

cuda_backend = pytest.importorskip("rnnfast.cuda_backend", reason="rnnfast.cpu (the shared operators) does not load")
CUDABackend = cuda_backend.CUDABackend

GPU_READY = torch.cuda.is_available() and get_backend("cuda").unavailable_reason() is None
gpu = pytest.mark.skipif(not GPU_READY, reason="needs a CUDA device and the rnnfast._cuda extension")
LOW = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]


# ---- host side: runs everywhere ------------------------------------------------------------------


def test_unavailable_reason_names_what_is_missing():
    why = get_backend("cuda").unavailable_reason()
    if torch.version.cuda is None:
        assert why is not None and "CPU-only build" in why
    elif cuda_backend._cuda is None:
        assert why is not None and "rnnfast._cuda" in why
    elif not torch.cuda.is_available():
        assert why == "no CUDA device"
    else:
        assert why is None
    assert ("cuda" in rnnfast.available_backends()) == (why is None)


def test_unsupported_reason_checks_device_and_dtype():
    b = CUDABackend()
    spec = RNNSpec("LSTM", 3, 4)
    assert "CUDA tensors only" in b.unsupported_reason(spec, torch.empty(0), False)
    fake = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.int32)
    assert "dtype torch.int32 is not supported" in b.unsupported_reason(spec, fake, False)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        fake = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)
        assert b.unsupported_reason(spec, fake, True) is None


def test_explicit_cuda_on_cpu_falls_back_with_its_reason():
    registry._WARNED.clear()
    lstm = rnnfast.LSTM(3, 4, backend="cuda")
    ref = torch.nn.LSTM(3, 4)
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 2, 3)
    with pytest.warns(BackendFallbackWarning, match="backend 'cuda' cannot run this call"):
        out, _ = lstm(x)
    torch.testing.assert_close(out, ref(x)[0])


@pytest.mark.parametrize(
    "T,B,kw,grad,want",
    [
        (1, 1, {}, False, True),
        (16, 4, {"num_layers": 3}, False, True),
        (17, 1, {}, False, False),  # long: the layer loop
        (1, 5, {}, False, False),  # past the kernel's row bound
        (1, 0, {}, False, False),  # empty batch
        (1, 1, {}, True, False),  # autograd needs the saved layer loop
        (1, 1, {"bidirectional": True}, False, False),
        (1, 1, {"proj_size": 2}, False, False),
        (1, 1, {"num_layers": 2, "dropout": 0.5, "training": True}, False, False),
        (1, 1, {"num_layers": 2, "dropout": 0.5}, False, True),  # eval: no dropout
    ],
)
def test_decode_choice(T, B, kw, grad, want):
    spec = RNNSpec("LSTM", 3, 4, **kw)
    x = torch.empty(T, B, 3)
    assert cuda_backend.takes_decode(spec, x, None, grad, max_b=4) is want


def test_decode_choice_packed():
    x = torch.empty(2, 1, 3)
    assert not cuda_backend.takes_decode(RNNSpec("GRU", 3, 4), x, torch.tensor([1, 1]), False, max_b=4)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the build switches with a CPU-only torch")
def test_setup_builds_no_cuda_extension_with_cpu_torch():
    """setup.py: with a CPU-only torch the extensions are the CPU one only; RNNFAST_CUDA=1 then fails and says why."""
    root = Path(__file__).resolve().parents[1]
    probe = ("import setuptools; setuptools.setup = lambda **kw: print([e.name for e in kw['ext_modules']]); "
             "import setup")

    def run(switch):
        env = {k: v for k, v in os.environ.items() if k not in ("RNNFAST_CUDA", "RNNFAST_NO_EXT")}
        env.update({} if switch is None else {"RNNFAST_CUDA": switch})
        return subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)

    for switch in (None, "0"):
        r = run(switch)
        assert r.returncode == 0 and r.stdout.strip() == "['rnnfast._C']", r.stderr
    r = run("1")
    assert r.returncode != 0 and "RNNFAST_CUDA=1 but the CUDA extension cannot be built" in r.stderr
    assert "build without CUDA" in r.stderr


class _Stub(Backend):
    """A backend that runs nothing, available or not, refusing float64 when asked to."""

    def __init__(self, name: str, no_f64: bool) -> None:
        self.name, self.no_f64 = name, no_f64

    def unsupported_reason(self, spec, x, packed):
        return "no float64" if self.no_f64 and x.dtype == torch.float64 else None


def test_auto_takes_cuda_where_triton_cannot(monkeypatch):
    """auto on a CUDA tensor: triton first, cuda where triton refuses the call (float64 today)."""
    for name, no_f64 in (("triton", True), ("cuda", False)):
        stub = _Stub(name, no_f64)
        monkeypatch.setitem(registry._REGISTRY, name, lambda stub=stub: stub)
        monkeypatch.setitem(registry._INSTANCES, name, stub)
    monkeypatch.setattr(registry, "_RESOLVED", {})
    spec = RNNSpec("LSTM", 3, 4)
    on_gpu = {dt: SimpleNamespace(device=torch.device("cuda", 0), dtype=dt) for dt in (torch.float32, torch.float64)}
    assert registry._choose("auto", spec, on_gpu[torch.float32], False).name == "triton"
    assert registry._choose("auto", spec, on_gpu[torch.float64], False).name == "cuda"
    assert registry._choose("cuda", spec, on_gpu[torch.float32], False).name == "cuda"
    assert registry.auto_order(torch.device("cpu"))[0] == "cpu"


# ---- GPU: parity in low precision, decode, cache, argument checks --------------------------------

GPU_GRID = [pytest.param(family, case, id=f"{family}-{case.id}")
            for family, cases in LAYER_CASES.items() for case in cases]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family,case", GPU_GRID)
def test_gpu_low_precision(family, case, dtype):
    check_layer(family, case, "cuda", dtype, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("family", ["LSTMCell", "GRUCell", "RNNCell"])
def test_gpu_cells_low_precision(family, dtype):
    check_cell(family, Case("cell", B=4), "cuda", dtype, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("family,case", [
    ("LSTM", Case("gpu-B300-H96", dict(num_layers=2, bidirectional=True), I=40, H=96, T=20, B=300)),
    ("LSTM", Case("gpu-proj-B70", dict(proj_size=48), I=16, H=100, T=12, B=70, packed="unsorted")),
    ("GRU", Case("gpu-B130-H128", I=24, H=128, T=16, B=130, packed="unsorted")),
    ("RNN", Case("gpu-B65-H127", dict(nonlinearity="relu"), I=24, H=127, T=16, B=65)),
    ("LSTM", Case("gpu-H600", dict(num_layers=2), I=64, H=600, T=10, B=33)),
], ids=lambda v: v.id if isinstance(v, Case) else v)
def test_gpu_larger(family, case, dtype):
    check_layer(family, case, "cuda", dtype, "cuda")


def _pair(family: str, I: int, H: int, dtype, **kw):
    """torch.nn's layer (float64 for float64, else float32) and rnnfast's on cuda in ``dtype``, same weights."""
    torch.manual_seed(0)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ref = getattr(torch.nn, family)(I, H, **kw).to("cuda", ref_dtype)
    ours = getattr(rnnfast, family)(I, H, backend="cuda", **kw).to("cuda", ref_dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.to(dtype)


DECODE_FAMILIES = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]
DECODE_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64"), *LOW]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DECODE_DTYPES)
@pytest.mark.parametrize("family,kw", DECODE_FAMILIES, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("T,B,layers,bias", [(1, 1, 2, True), (3, 4, 1, False), (5, 2, 3, True)])
def test_gpu_decode_matches_torch(family, kw, dtype, T, B, layers, bias, monkeypatch):
    """Carried state, token by token, against torch.nn (float32 reference for low precision); the
    decode kernel must really run."""
    calls = []
    real = cuda_backend._cuda.decode
    monkeypatch.setattr(cuda_backend._cuda, "decode", lambda *a: calls.append(1) or real(*a), raising=False)
    ref, ours = _pair(family, 24, 72, dtype, num_layers=layers, bias=bias, **kw)
    ref_dtype = next(ref.parameters()).dtype
    atol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(4, T, B, 24, generator=g, dtype=torch.float64).cuda()
    lstm = family == "LSTM"
    state_ref = state_ours = None
    with torch.no_grad():
        for x in xs:
            want, state_ref = ref(x.to(ref_dtype), state_ref)
            got, state_ours = ours(x.to(dtype), state_ours)
            torch.testing.assert_close(got.to(ref_dtype), want, atol=atol, rtol=atol)
            for a, b in zip(state_ours if lstm else (state_ours,), state_ref if lstm else (state_ref,)):
                torch.testing.assert_close(a.to(ref_dtype), b, atol=atol, rtol=atol)
    assert len(calls) == len(xs), "the decode path did not run"


@pytest.mark.gpu
@gpu
def test_gpu_decode_cache_follows_parameter_updates():
    ref, ours = _pair("LSTM", 8, 16, torch.float32, num_layers=2)
    x = torch.randn(1, 1, 8, device="cuda")
    with torch.no_grad():
        ours(x)
        for p in (*ref.parameters(), *ours.parameters()):
            p.mul_(0.5)  # in place: same tensors and storage, new version
        torch.testing.assert_close(ours(x)[0], ref(x)[0])
        ours.load_state_dict({k: v * 2 for k, v in ref.state_dict().items()})  # new values copied in
        ref.load_state_dict({k: v * 2 for k, v in ref.state_dict().items()})
        torch.testing.assert_close(ours(x)[0], ref(x)[0])


@pytest.mark.gpu
@gpu
def test_gpu_operator_argument_checks():
    dev = "cuda"
    x = torch.randn(3, 2, 4, device=dev)
    h0 = torch.zeros(2, 5, device=dev)
    c0 = torch.zeros(2, 5, device=dev)
    w_ih, w_hh = torch.randn(20, 4, device=dev), torch.randn(20, 5, device=dev)
    op = torch.ops.rnnfast.layer_fwd
    args = dict(mode=MODE_ID["LSTM"], batch_sizes=None, b_ih=None, b_hh=None, w_hr=None, reverse=False, save=False)

    def call(**over):
        a = dict(args, x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, **over)
        return op(a["mode"], a["x"], a["batch_sizes"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                  a["b_hh"], a["w_hr"], a["reverse"], a["save"])

    call()  # the valid call runs
    with pytest.raises(RuntimeError, match="h0 has dtype"):
        call(h0=h0.double())
    with pytest.raises(RuntimeError, match="must be on"):
        call(w_hh=w_hh.cpu())
    with pytest.raises(RuntimeError, match="weight_ih has shape"):
        call(w_ih=torch.randn(20, 3, device=dev))
    with pytest.raises(RuntimeError, match="LSTM needs c0"):
        call(c0=None)
    with pytest.raises(RuntimeError, match="not supported"):
        call(x=x.to(torch.int32), h0=h0.to(torch.int32), c0=c0.to(torch.int32), w_ih=w_ih.to(torch.int32),
             w_hh=w_hh.to(torch.int32))
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        cuda_backend._cuda.decode(MODE_ID["GRU"], [torch.randn(15, 4, device=dev), torch.randn(15, 5, device=dev)], 1,
                                  False, torch.randn(1, 5, 4, device=dev), torch.zeros(1, 5, 5, device=dev), None)


@pytest.mark.gpu
@gpu
def test_gpu_no_fallback_warning_for_supported_calls():
    lstm = rnnfast.LSTM(8, 16, num_layers=2, proj_size=4, bidirectional=True, backend="cuda").cuda().half()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        out, _ = lstm(torch.randn(5, 3, 8, device="cuda", dtype=torch.half))
    assert out.shape == (5, 3, 8) and torch.isfinite(out).all()
