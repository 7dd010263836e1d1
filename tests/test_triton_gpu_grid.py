"""GPU correctness grid of every kernel ``"auto"`` can pick (``make gpu-check``, phase 1):
LSTM/GRU x bfloat16 / float32 TF32 off / TF32 on x hidden 128, 130, 256, 1024 x batch
1, 3, 16, 256 x T 1, 7, 100, each case plain, bidirectional (reverse) or packed.

Each case: outputs and every gradient against a float64 torch.nn (the reference) within
a relative tolerance per precision, or within twice torch.nn's own error in the same
precision; the rnnfast run twice with freed memory poisoned (NaN) before each, and both
runs bit-identical (an unwritten output or a race shows). ``RNNFAST_GPU_SHARD=i/n`` runs
every n-th case from i; ``RNNFAST_GPU_GRID_OUT`` appends one JSON line per case.
"""

import json
import os
import warnings

import pytest
import torch

import rnnfast
from parity import TORCH_CLASSES, Case, make_inputs, run_layer
from rnnfast.backend import BackendFallbackWarning

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# relative (max-norm) tolerance against float64, per precision
PRECISIONS = {"bf16": (torch.bfloat16, False, 2e-2), "fp32": (torch.float32, False, 1e-5),
              "tf32": (torch.float32, True, 5e-3)}


def _grid() -> list:
    cases, n = [], 0
    for family in ("LSTM", "GRU"):
        for prec in PRECISIONS:
            for H in (128, 130, 256, 1024):
                for B in (1, 3, 16, 256):
                    for T in (1, 7, 100):
                        variant = ("plain", "bidir", "packed")[n % 3]
                        n += 1
                        kwargs = dict(bidirectional=True) if variant == "bidir" else {}
                        case = Case(f"{family}-{prec}-H{H}-B{B}-T{T}-{variant}", kwargs, I=64, H=H, T=T, B=B,
                                    packed="unsorted" if variant == "packed" and B > 1 else None)
                        cases.append(pytest.param(family, prec, case, id=case.id))
    shard = os.environ.get("RNNFAST_GPU_SHARD")
    if shard:
        i, k = map(int, shard.split("/"))
        cases = cases[i::k]
    return cases


def _poison() -> None:
    """Fill the allocator's free memory with NaN, so outputs a kernel leaves unwritten show."""
    free = torch.cuda.mem_get_info()[0]
    junk = torch.empty(max(1, min(free // 2, 8 << 30)) // 4, dtype=torch.float32, device="cuda")
    junk.fill_(float("nan"))
    del junk


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


@pytest.mark.parametrize("family,prec,case", _grid())
def test_gpu_grid(family, prec, case):
    dtype, tf32, tol = PRECISIONS[prec]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        torch.manual_seed(0)
        ref = TORCH_CLASSES[family](case.I, case.H, **case.kwargs).to(device="cuda", dtype=torch.float64)
        same = TORCH_CLASSES[family](case.I, case.H, **case.kwargs).to(device="cuda", dtype=dtype)
        ours = getattr(rnnfast, family)(case.I, case.H, backend="triton", **case.kwargs).to(device="cuda",
                                                                                          dtype=dtype)
        same.load_state_dict(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        D = 2 if case.kwargs.get("bidirectional") else 1
        inputs = make_inputs(case, [case.H] * (2 if family == "LSTM" else 1), D)
        want, want_g = run_layer(ref, case, inputs, torch.float64, "cuda")
        nn_out, nn_g = run_layer(same, case, inputs, dtype, "cuda")
        runs = []
        for _ in range(2):
            for p in ours.parameters():
                p.grad = None
            _poison()
            with warnings.catch_warnings():
                warnings.simplefilter("error", BackendFallbackWarning)
                runs.append(run_layer(ours, case, inputs, dtype, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    (got, got_g), (again, again_g) = runs
    report = {"case": case.id, "tol": tol, "errors": {}, "identical": True}
    failures = []
    named = [(f"output {k}", a, b, n) for k, (a, b, n) in enumerate(zip(got, want, nn_out))]
    named += [(f"grad {k}", got_g[k], want_g[k], nn_g[k]) for k in want_g]
    repeat = [a for a in again] + [again_g[k] for k in want_g]
    for (name, a, ref_t, nn_t), a2 in zip(named, repeat):
        e_ours, e_nn = _rel_err(a, ref_t), _rel_err(nn_t, ref_t)
        report["errors"][name] = [e_ours, e_nn]
        if not e_ours <= max(tol, 2 * e_nn):
            failures.append(f"{name}: rel err {e_ours:.2e} > max(tol {tol:.0e}, 2 x torch.nn's {e_nn:.2e})")
        if not torch.equal(a, a2):
            report["identical"] = False
            failures.append(f"{name}: two runs differ (race or unwritten output)")
    out = os.environ.get("RNNFAST_GPU_GRID_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({**report, "ok": not failures}) + "\n")
    assert not failures, "; ".join(failures)
