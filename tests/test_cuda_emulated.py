"""The cuda backend's layer loop and cell math, run on the CPU.

``tests/cuda_emulate.cpp`` compiles ``csrc/cuda/loop.h`` (the time loop of
``rnnfast::layer_fwd`` / ``layer_bwd`` on CUDA) with the element functions of
``csrc/cuda/cell.cuh`` (what each gate kernel thread runs) as host code, so the
forward and backward of every mode and option, in all four dtypes, are checked
against the ``reference`` backend and autograd without a GPU. Built once with
ninja (about a minute of CPU) and cached under ``~/.cache/rnnfast/``; needs the
CUDA toolkit's headers (cuda_fp16.h) only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rnnfast.backend import GATES, MODE_ID, LayerWeights, RNNSpec, get_backend

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RNNFAST_CACHE") or Path.home() / ".cache" / "rnnfast")
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (the CUDA toolkit's headers are needed)")

# float64 and float32 against a float64 reference; the low-precision types store gates and states rounded
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def ops():
    from torch.utils import cpp_extension

    dryrun = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True)
    top = Path(re.search(r"^#\$ TOP=(.+)$", dryrun.stderr + dryrun.stdout, re.M).group(1).strip()).resolve()
    build = CACHE / "emulate-build"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="rnnfast_cuda_emu",
        sources=[str(ROOT / "tests" / "cuda_emulate.cpp")],
        extra_include_paths=[str(ROOT / "csrc" / "cuda"), str(top / "include")],
        extra_cflags=["-O1", "-std=c++17"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.rnnfast_cuda_emu


CASES = [
    # T, B, I, H, proj_size, bias, packed lengths (None: not packed), reverse
    pytest.param(5, 3, 4, 6, 0, True, None, False, id="base"),
    pytest.param(4, 2, 3, 5, 0, False, None, True, id="reverse-no-bias"),
    pytest.param(6, 4, 3, 5, 0, True, [6, 4, 4, 1], False, id="packed"),
    pytest.param(6, 4, 3, 5, 0, True, [6, 5, 2, 2], True, id="packed-reverse"),
    pytest.param(5, 3, 4, 6, 3, True, None, False, id="proj"),
    pytest.param(6, 3, 2, 5, 2, False, [6, 3, 1], True, id="proj-packed-reverse-no-bias"),
    pytest.param(1, 1, 2, 3, 0, True, None, False, id="T1-B1"),
]
DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float64, torch.float32, torch.bfloat16,
                                                                torch.float16)]
MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mode,T,B,I,H,P,bias,lengths,reverse",
    [pytest.param(mode, *case.values, id=f"{mode}-{case.id}") for mode in MODES for case in CASES
     if mode == "LSTM" or case.values[4] == 0],  # proj_size exists for LSTM only
)
def test_layer_matches_reference(ops, mode, T, B, I, H, P, bias, lengths, reverse, dtype):
    g = torch.Generator().manual_seed(0)
    G, K = GATES[mode], P or H

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64) / 2

    w = LayerWeights(rnd(G * H, I), rnd(G * H, K), rnd(G * H) if bias else None, rnd(G * H) if bias else None,
                     rnd(P, H) if P else None)
    x, h0 = rnd(T, B, I), rnd(B, K)
    c0 = rnd(B, H) if mode == "LSTM" else None
    bs = None
    if lengths is not None:
        bs = (torch.tensor(lengths).unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
    g_out, g_h, g_c = rnd(T, B, K), rnd(B, K), rnd(B, H)

    # reference: float64 with autograd
    leaves = [t.clone().requires_grad_() for t in (x, h0, *(t for t in w if t is not None))]
    ref_x, ref_h0, *ref_w = leaves
    ref_c0 = c0.clone().requires_grad_() if c0 is not None else None
    it = iter(ref_w)
    ref_lw = LayerWeights(*(next(it) if t is not None else None for t in w))
    out, h_n, c_n = get_backend("reference").layer(mode, ref_x, bs, ref_h0, ref_c0, ref_lw, reverse)
    loss = (out * g_out).sum() + (h_n * g_h).sum() + ((c_n * g_c).sum() if c_n is not None else 0)
    want_grads = torch.autograd.grad(loss, leaves + ([ref_c0] if ref_c0 is not None else []))

    # emulated cuda loop in dtype
    cast = [None if t is None else t.to(dtype) for t in (x, h0, c0, *w, g_out, g_h, g_c)]
    xd, h0d, c0d, w_ih, w_hh, b_ih, b_hh, w_hr, god, ghd, gcd = cast
    got = ops.layer_fwd(MODE_ID[mode], xd, bs, h0d, c0d, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, True)
    tol = TOL[dtype]
    for name, a, b in (("out", got[0], out), ("h_n", got[1], h_n)) + ((("c_n", got[2], c_n),) if c0 is not None
                                                                       else ()):
        torch.testing.assert_close(a.double(), b.detach(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    empty = xd.new_empty(0)
    grads = ops.layer_bwd(MODE_ID[mode], xd, bs, h0d, c0d, w_ih, w_hh, w_hr, bias, reverse, got[0], got[3], got[4],
                          god, ghd, gcd if c0 is not None else empty)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = grads
    got_grads = [dx, dh0, dw_ih, dw_hh] + ([db_ih, db_hh] if bias else []) + ([dw_hr] if P else [])
    got_grads += [dc0] if c0 is not None else []
    names = ["x", "h0", "w_ih", "w_hh"] + (["b_ih", "b_hh"] if bias else []) + (["w_hr"] if P else []) + (
        ["c0"] if c0 is not None else [])
    for name, a, b in zip(names, got_grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=tol * 4, rtol=tol * 4, msg=lambda m: f"grad {name}: {m}")


def test_unsaved_forward_needs_no_workspace(ops):
    x, h0 = torch.randn(3, 2, 4), torch.randn(2, 5)
    out, h, c, ws1, ws2 = ops.layer_fwd(MODE_ID["GRU"], x, None, h0, None, torch.randn(15, 4), torch.randn(15, 5),
                                        None, None, None, False, False)
    assert ws1.numel() == 0 and ws2.numel() == 0 and out.shape == (3, 2, 5) and torch.equal(out[-1], h)


def test_argument_checks(ops):
    x, h0, c0 = torch.randn(3, 2, 4), torch.randn(2, 5), torch.randn(2, 5)
    w_ih, w_hh = torch.randn(20, 4), torch.randn(20, 5)

    def fwd(**over):
        a = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, bs=None, w_hr=None, mode=MODE_ID["LSTM"]) | over
        return ops.layer_fwd(a["mode"], a["x"], a["bs"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], None, None,
                             a["w_hr"], False, False)

    fwd()
    with pytest.raises(RuntimeError, match="h0 has dtype"):
        fwd(h0=h0.double())
    with pytest.raises(RuntimeError, match=r"weight_ih has shape \[20, 3\], expected \[20, 4\]"):
        fwd(w_ih=torch.randn(20, 3))
    with pytest.raises(RuntimeError, match="h0 has shape"):
        fwd(h0=torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="LSTM needs c0"):
        fwd(c0=None)
    with pytest.raises(RuntimeError, match="proj_size is only supported for LSTM"):
        fwd(mode=MODE_ID["GRU"], w_ih=torch.randn(15, 4), w_hh=torch.randn(15, 2), h0=torch.randn(2, 2),
            w_hr=torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="batch_sizes must be non-increasing"):
        fwd(bs=torch.tensor([1, 2, 2]))
    with pytest.raises(RuntimeError, match="is not supported"):
        fwd(x=x.int(), h0=h0.int(), c0=c0.int(), w_ih=w_ih.int(), w_hh=w_hh.int())
    with pytest.raises(RuntimeError, match="needs what layer_fwd saves"):
        e = torch.empty(0)
        ops.layer_bwd(MODE_ID["LSTM"], x, None, h0, c0, w_ih, w_hh, None, False, False, torch.zeros(3, 2, 5), e, e,
                      torch.zeros(3, 2, 5), torch.zeros(2, 5), torch.zeros(2, 5))


def _stack(mode: str, L: int, I: int, H: int, bias: bool, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    G, flat = GATES[mode], []
    for layer in range(L):
        flat += [torch.randn(G * H, I if layer == 0 else H, generator=g, dtype=torch.float64) / 2,
                 torch.randn(G * H, H, generator=g, dtype=torch.float64) / 2]
        if bias:
            flat += [torch.randn(G * H, generator=g, dtype=torch.float64) / 2 for _ in range(2)]
    return [w.to(dtype) for w in flat]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,L,bias", [(1, 1, 1, True), (3, 4, 2, False), (2, 3, 3, True)])
@pytest.mark.parametrize("mode", MODES)
def test_decode_matches_reference(ops, mode, T, B, L, bias, dtype):
    I, H = 5, 6
    weights = _stack(mode, L, I, H, bias, torch.float64)
    g = torch.Generator().manual_seed(4)
    x, h0, c0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((T, B, I), (L, B, H), (L, B, H)))
    spec = RNNSpec(mode, I, H, num_layers=L, bias=bias)
    lstm = mode == "LSTM"
    want = get_backend("reference").rnn(spec, x, None, h0, c0 if lstm else None, weights)
    got = ops.decode(MODE_ID[mode], [w.to(dtype) for w in weights], L, bias, x.to(dtype), h0.to(dtype),
                     c0.to(dtype) if lstm else None)
    tol = TOL[dtype]
    for name, a, b in zip(("out", "h_n", "c_n"), got, want):
        if b is None:
            assert a.numel() == 0
            continue
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_decode_cache_follows_weight_updates(ops):
    """The packed biases are cached per weight list: an in-place update, a new tensor or new storage
    must be seen by the next call."""
    weights = _stack("GRU", 2, 4, 5, True, torch.float32)
    x, h0 = torch.randn(1, 2, 4), torch.randn(2, 2, 5)
    spec = RNNSpec("GRU", 4, 5, num_layers=2)

    def check():
        want = get_backend("reference").rnn(spec, x, None, h0, None, weights)
        got = ops.decode(MODE_ID["GRU"], weights, 2, True, x, h0, None)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])

    check()
    weights[3].add_(1.0)  # b_hh of layer 0, in place: version counter
    check()
    weights[6] = weights[6] * 2  # b_ih of layer 1: a new tensor
    check()
    weights[7].set_(weights[7].clone() - 1)  # b_hh of layer 1: new storage
    check()


def test_decode_argument_checks(ops):
    weights = _stack("LSTM", 1, 4, 5, True, torch.float32)
    x, h0, c0 = torch.randn(1, 2, 4), torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError, match="at most 4 rows"):
        ops.decode(MODE_ID["LSTM"], weights, 1, True, torch.randn(1, 5, 4), torch.randn(1, 5, 5),
                   torch.randn(1, 5, 5))
    with pytest.raises(RuntimeError, match="expected 4 weights, got 2"):
        ops.decode(MODE_ID["LSTM"], weights[:2], 1, True, x, h0, c0)
    with pytest.raises(RuntimeError, match="LSTM needs c0"):
        ops.decode(MODE_ID["LSTM"], weights, 1, True, x, h0, None)
    with pytest.raises(RuntimeError, match="weight_ih has shape"):
        ops.decode(MODE_ID["LSTM"], weights, 1, True, torch.randn(1, 2, 3), h0, c0)
