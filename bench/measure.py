"""Timing and memory: every provider on one case, interleaved, and the loop over a grid.

Timer: each provider's step is calibrated to a batch of calls lasting about
``min_seconds``; then rounds run every provider's batch once, in turn, so machine
noise hits them alike (the CPU is shared and noisy). On CPU a batch is timed with
``perf_counter``, on GPU with CUDA events. A provider's p20/p50/p80 are over its
rounds' per-call times; its speed-up over torch.nn is the median of the per-round
ratios (``paired_speedup``).

Peak memory of one call: on GPU ``torch.cuda.max_memory_allocated`` during the call,
minus what was allocated before it; on CPU the peak of torch's CPU allocator during
the call (allocations minus frees, from the profiler's memory events), minus what was
live before it. Both count the memory a call needs beyond the model and its input
(activations, saved tensors, workspace, outputs). ONNX Runtime allocates outside
torch's allocator: not measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
import warnings
from dataclasses import asdict, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

import rnnfast
from rnnfast.backend import BackendFallbackWarning

from .cases import Case
from .providers import Built, Inputs, Provider, Unsupported, module_step

Step = Callable[[], Any]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep what is freed (no trimming, no mmap), and say so for the report.

    By default glibc hands large freed blocks back to the kernel, so the next call that allocates
    them page-faults every 4 KiB afresh; how often depends on what ran before (2-core Xeon, before
    this setting: torch.nn's bfloat16 LSTM B64 H256 training step 36.9 ms in a process of its own,
    22.4 ms after the grid's earlier cases; bench/results/2026-12-04-cpu-plain-malloc-{alone,grid}.md).
    Kept, every provider runs without that cost, whatever the order of
    cases: torch.nn at its best. rnnfast's own buffers are pooled either way.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        return f"default (mallopt unavailable: {err})"
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and mallopt(M_TOP_PAD, 64 << 20)):
        return "default (mallopt refused)"
    return "glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD 64 MiB)"


def paired_speedup(base: list[float], other: list[float]) -> dict:
    """The speed-up of ``other`` over ``base`` from their batches in the same rounds: the p20/p50/p80 of
    the per-round ratios base / other. A round's two batches run seconds apart, so a change in the
    machine's speed over minutes (up to 1.5x on the 2-vCPU KVM Xeons) divides out of each ratio, where
    it stays in the ratio of the two medians taken over all rounds."""
    ratios = np.asarray(base[: len(other)]) / np.asarray(other[: len(base)])
    p20, p50, p80 = (float(v) for v in np.percentile(ratios, [20, 50, 80]))
    return {"speedup": p50, "speedup_p20": p20, "speedup_p80": p80, "paired_rounds": len(ratios)}


def time_batch(step: Step, calls: int, device: str) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - t0) / calls


def peak_memory(step: Step, device: str) -> tuple[Optional[int], str]:
    """Bytes one call allocates at its peak beyond what was live before it, and how that was measured."""
    if device == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    try:
        from torch._C._profiler import _ExperimentalConfig, ProfilerActivity, ProfilerConfig, ProfilerState
        from torch.autograd.profiler import _disable_profiler, _enable_profiler, _prepare_profiler
    except ImportError as err:  # private API: report the method as unavailable rather than fail the run
        return None, f"profiler memory events unavailable ({err})"
    # the profiler's low-level switch: torch.profiler.profile costs seconds per use on this machine
    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    acts = {ProfilerActivity.CPU}
    _prepare_profiler(config, acts)
    _enable_profiler(config, acts)
    try:
        step()
    finally:
        result = _disable_profiler()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in result.events() if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak, "torch CPU allocator (profiler memory events)"


def _max_abs_err(out: Any, ref: Tensor) -> Optional[float]:
    if not isinstance(out, Tensor) or out.shape != ref.shape:
        return None
    return (out.detach().float().to(ref.device) - ref).abs().max().item()


def _row(case: Case, provider: str, device: str, status: str, reason: str = "", **kw: Any) -> dict:
    return {"provider": provider, "device": device, **asdict(case), "label": case.label, "status": status,
            "reason": reason, **kw}


def run_case(case: Case, providers: list[Provider], device: str, repeats: int, min_seconds: float,
             max_provider_s: float = 12.0) -> list[dict]:
    """One result row per provider in scope for ``case`` (timed, or with the reason it is not)."""
    torch.manual_seed(0)
    layers = {} if case.cell else {"num_layers": case.layers}
    ref = getattr(torch.nn, case.family)(case.I, case.H, **layers).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.T, case.B, case.I, generator=g).to(device)
    inputs = Inputs(x, torch.randn(case.T, case.B, case.H, generator=g).to(device))
    with torch.no_grad():
        expected = module_step(ref, replace(case, mode="fwd"), inputs, torch.float32)()
    rows, built = [], {}
    for p in providers:
        if not p.applies(case):
            continue
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # a fallback shows as ran_on (and as unsupported for one backend)
                warnings.simplefilter("ignore", BackendFallbackWarning)
                b: Built = p.build(case, ref, inputs)
                first = b.first if b.first is not None else b.step()
                _sync(device)
        except Unsupported as err:
            rows.append(_row(case, p.name, device, "unsupported", str(err)))
            continue
        except Exception as err:  # record and go on: one failing provider must not lose the case
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            rows.append(_row(case, p.name, device, "error", f"{type(err).__name__}: {msg}"))
            continue
        built[p.name] = b
        rows.append(_row(case, p.name, device, "ok", ran_on=b.ran_on, max_abs_err=_max_abs_err(first, expected),
                         out_dtype=str(getattr(first, "dtype", "float32")).replace("torch.", ""),
                         setup_s=time.perf_counter() - t0))
    # calls per batch so a batch lasts ~min_seconds; rounds capped so a slow provider spends ~max_provider_s
    calls, rounds = {}, {}
    for name, b in built.items():
        once = max(time_batch(b.step, 1, device), 1e-7)
        calls[name] = max(1, math.ceil(min_seconds / once))
        rounds[name] = max(3, min(repeats, int(max_provider_s / (once * calls[name]))))
    samples: dict[str, list[float]] = {n: [] for n in built}
    for r in range(max(rounds.values(), default=0)):
        for name, b in built.items():  # interleaved: every provider once per round
            if r < rounds[name]:
                samples[name].append(time_batch(b.step, calls[name], device))
    for row in rows:
        name = row["provider"]
        if name not in built:
            continue
        p20, p50, p80 = (float(v) * 1e3 for v in np.percentile(samples[name], [20, 50, 80]))
        if "torch" in samples and name != "torch":
            row.update(paired_speedup(samples["torch"], samples[name]))
        mem, how = peak_memory(built[name].step, device) if name != "onnxruntime" else \
            (None, "not measured (ONNX Runtime's own allocator)")
        row.update(p20_ms=p20, p50_ms=p50, p80_ms=p80, tokens_per_s=case.tokens / (p50 / 1e3),
                   gflop_per_s=case.flops / (p50 / 1e3) / 1e9,
                   peak_mem_bytes=mem, mem_method=how, rounds=rounds[name], calls_per_round=calls[name])
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


ROOF_SHAPE = (4096, 1024, 1024)  # M, K, N: large enough to run at the library's best rate


def gemm_roof(dtype: str, device: str, repeats: int = 7) -> tuple[float, str]:
    """The most GEMM work per second this machine can do at ``dtype`` on the bench's threads, and
    how it was found: the higher of the best of ``repeats`` batches of one large ``torch.matmul``
    and, on a CPU where the fused loop runs, the peak of the multiply-add instructions that loop
    uses (``rnnfast._C.peak_gflops``). Each provider's GFLOP/s is set against it. A CPU without
    bfloat16 products (AVX512-BF16) gets the float32 roof for bfloat16: widening to float32 is the
    fastest bfloat16 GEMM there (torch.matmul's own ran at 0.7 GFLOP/s, 12 s a call, on an AVX2 EPYC)."""
    if device == "cpu" and dtype == "bfloat16" and "cpu" in rnnfast.available_backends():
        from rnnfast import _C

        if not _C.has_bf16_loop():
            rate, how = gemm_roof("float32", device, repeats)
            return rate, f"no bfloat16 products on this CPU: the float32 roof, {how}"
    m, k, n = ROOF_SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, getattr(torch, dtype))
    b = torch.randn(k, n, generator=g).to(device, getattr(torch, dtype))
    per_call = time_batch(lambda: a @ b, 2, device)  # warm-up, and the size of a ~0.1 s batch
    calls = max(1, math.ceil(0.1 / per_call))
    secs = min(time_batch(lambda: a @ b, calls, device) for _ in range(repeats))
    best = 2 * m * k * n / secs / 1e9, f"one {m}x{k} @ {k}x{n} torch.matmul"
    if device == "cpu" and "cpu" in rnnfast.available_backends():
        from rnnfast import _C

        peak = _C.peak_gflops(dtype)
        if peak > best[0]:
            best = peak, (f"the fused loop's {_C.product_isa(dtype)} peak on every thread "
                          f"(register-resident chains, above {best[1]}'s {best[0]:.0f})")
    return best


def estimate_s(case: Case, done: list[tuple[Case, float]]) -> float:
    """Seconds ``case`` will take, scaled by cost from the most similar finished case (same mode, dtype)."""
    similar = [(c, s) for c, s in done if c.mode == case.mode and c.dtype == case.dtype] or done
    if not similar:
        return 1.0
    near, secs = min(similar, key=lambda cs: abs(math.log(cs[0].cost / case.cost)))
    return secs * max(case.cost / near.cost, 0.2)


def run_grid(grid: list[Case], providers: list[Provider], device: str, repeats: int, min_seconds: float,
             budget_s: Optional[float] = None, on_case: Optional[Callable[[list[dict]], None]] = None,
             log: Callable[[str], None] = print, max_setup_s: float = 90.0) -> list[dict]:
    """Every case of ``grid``; with ``budget_s``, a case estimated to overrun what is left is skipped
    (recorded with the reason). A provider whose setup (build, compilation, first call) took over
    ``max_setup_s`` on a case is not run on later ones (each is recorded as skipped, with the reason):
    FlashRNN and Haste compile per configuration. ``on_case`` gets the rows so far after every case."""
    available = [p for p in providers if p.unavailable() is None]
    dropped: dict[str, str] = {}
    rows: list[dict] = []
    done: list[tuple[Case, float]] = []
    t_start = time.monotonic()
    for k, case in enumerate(grid):
        left = None if budget_s is None else budget_s - (time.monotonic() - t_start)
        need = estimate_s(case, done)
        if left is not None and need > left:
            why = f"needs ~{need:.0f}s, {max(left, 0):.0f}s of the budget left"
            rows += [_row(case, p.name, device, "skipped", why) for p in available if p.applies(case)]
            log(f"[{k + 1}/{len(grid)}] {case.dtype} {case.label}: skipped (budget)")
        else:
            t0 = time.monotonic()
            case_rows = run_case(case, [p for p in available if p.name not in dropped], device, repeats, min_seconds)
            case_rows += [_row(case, n, device, "skipped", why) for n, why in dropped.items()
                          if next(p for p in available if p.name == n).applies(case)]
            done.append((case, time.monotonic() - t0))
            for r in case_rows:
                if r.get("setup_s", 0) > max_setup_s:
                    dropped[r["provider"]] = f"its setup took {r['setup_s']:.0f}s on {case.label} ({case.dtype})"
            rows += case_rows
            cells = [f"{r['provider']} {r['p50_ms']:.3f}" + (f" ({r['speedup']:.2f}x)" if "speedup" in r else "")
                     if r["status"] == "ok" else f"{r['provider']} {r['status']}" for r in case_rows]
            log(f"[{k + 1}/{len(grid)} {time.monotonic() - t_start:5.0f}s] {case.dtype} {case.label} ms: "
                + ", ".join(cells))
        if on_case:
            on_case(rows)
    return rows
