"""``python -m bench.gpu``: the GPU grid, rnnfast's ``triton`` backend against
torch.nn (cuDNN), forward and forward+backward.

Grid: LSTM and GRU; float32 (TF32 off for both sides) and bfloat16;
B in {1, 8, 16, 64, 256}, H (= I) in {128, 256, 512, 1024}, T in {100, 1024}.
Each timing is the median of CUDA-event-timed repetitions; the ratio is
torch's median over triton's (above 1: triton faster). A config that would
overrun the time budget is skipped, with the reason, rather than run.
Writes ``bench/results/<date>-<gpu>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import rnnfast
from rnnfast.backend import get_backend
from rnnfast.kernels import use_sequence_kernel
from rnnfast.kernels.utils import MODE_ID, dot_precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    """One config's result; times in milliseconds (``None`` when skipped)."""

    family: str
    dtype: str
    mode: str  # "fwd" (no grad) or "fwdbwd"
    T: int
    B: int
    H: int
    torch_ms: Optional[float] = None
    triton_ms: Optional[float] = None
    ratio: Optional[float] = None
    max_abs_err: Optional[float] = None
    kernel: str = ""
    skipped: str = ""
    reps: dict = field(default_factory=dict)
    # where "auto" newly picks the sequence kernel (float32 with 3xTF32 dots, 16-bit H 129-256):
    # the step kernels' time on the same config, to check that choice (T=100, B <= 16 only)
    triton_step_ms: Optional[float] = None


def cost(r: Row) -> float:
    """Relative work of a config (the recurrent GEMMs; launches at small sizes)."""
    return r.T * (max(r.B, 16) * r.H * r.H + 2e5) * (3 if r.mode == "fwdbwd" else 1)


def priority(r: Row) -> bool:
    """False (runs first) for the configs the targets are about: B <= 16 and H <= 512."""
    return not (r.B <= 16 and r.H <= 512)


def grid(families: list[str], dtypes: list[str], modes: list[str]) -> list[Row]:
    """Every config: the target ones (B <= 16, H <= 512) first, each group cheapest first, so
    a budget cut drops the most expensive configs outside the targets."""
    rows = [Row(f, d, m, T, B, H) for d in dtypes for f in families for m in modes
            for T in (100, 1024) for B in (1, 8, 16, 64, 256) for H in (128, 256, 512, 1024)]
    return sorted(rows, key=lambda r: (priority(r), cost(r), r.dtype, r.family))


def time_ms(fn: Callable[[], None], budget_s: float) -> tuple[float, int]:
    """Median milliseconds of ``fn`` over repetitions that fit ``budget_s`` (at least 3)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # compile / autotune / warm caches
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = max(3, min(25, int(budget_s * 1e3 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), reps


def make_call(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """A closure running forward (no grad) or forward+backward once."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return module(x)[0]
        return call

    params = list(module.parameters())

    def call():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)[0]
        out.backward(torch.ones_like(out))
        return out
    return call


def run_row(row: Row, per_provider_s: float) -> None:
    """Time one config on torch.nn (cuDNN) and the triton backend, filling ``row``."""
    dtype = DTYPES[row.dtype]
    torch.manual_seed(0)
    ref = getattr(torch.nn, row.family)(row.H, row.H).cuda().to(dtype)
    ours = getattr(rnnfast, row.family)(row.H, row.H, backend="triton").cuda().to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(row.T, row.B, row.H, device="cuda", dtype=dtype, requires_grad=row.mode == "fwdbwd")
    call_ref, call_ours = make_call(ref, x, row.mode), make_call(ours, x, row.mode)
    with torch.no_grad():
        row.max_abs_err = (ours(x)[0].float() - ref(x)[0].float()).abs().max().item()
    row.torch_ms, row.reps["torch"] = time_ms(call_ref, per_provider_s)
    row.triton_ms, row.reps["triton"] = time_ms(call_ours, per_provider_s)
    row.ratio = row.torch_ms / row.triton_ms
    fwd = use_sequence_kernel("auto", row.H, row.H, MODE_ID[row.family], dtype)
    bwd = use_sequence_kernel("auto", row.H, row.H, MODE_ID[row.family], dtype, backward=True)
    row.kernel = "sequence" if fwd else "step"
    if row.mode == "fwdbwd":
        row.kernel += ", sequence bwd" if bwd else ", step bwd"
    if dtype == torch.float32:
        row.kernel += f" ({dot_precision(dtype)} dots)"
    if fwd and row.T == 100 and row.B <= 16 and (dtype == torch.float32 or row.H > 128):
        backend = get_backend("triton")
        backend.kernel = "step"
        try:
            row.triton_step_ms, row.reps["triton_step"] = time_ms(call_ours, per_provider_s)
        finally:
            backend.kernel = "auto"


def estimate_s(row: Row, done: list[Row]) -> float:
    """Seconds a config will take, scaled from the most similar finished one."""
    timed = [r for r in done if r.triton_ms is not None and r.dtype == row.dtype and r.mode == row.mode]
    if not timed:
        return 1.0
    near = min(timed, key=lambda r: abs(math.log(cost(r) / cost(row))))
    per_call = (near.triton_ms + near.torch_ms) / 1e3 * cost(row) / cost(near)
    return per_call * 8 + 1.0  # warmup, correctness check and a few repetitions


def environment() -> dict:
    """Device and software versions, and the git commit of this checkout."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tf32": False,
        "timing": "median of CUDA-event-timed repetitions after one warmup call",
    }


def markdown(env: dict, rows: list[Row]) -> str:
    """The results as a markdown table headed by the environment."""
    lines = [
        f"# rnnfast GPU benchmark: triton vs torch.nn (cuDNN) on {env['device']}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, triton {env['triton']}, "
        f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {env['date']}. "
        "TF32 off (triton float32 dots: 3xTF32). Ratio = torch ms / triton ms (above 1: triton faster). "
        "I = H, one layer. step-kernels ms: triton forced onto its step kernels (where auto picks the sequence "
        "kernel newly: float32, or 16-bit H > 128; T=100, B <= 16).",
        "",
        "| family | dtype | mode | T | B | H | torch ms | triton ms | ratio | kernel | max abs err "
        "| step-kernels ms | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda r: (r.family, r.dtype, r.mode, r.T, r.B, r.H))
    for r in order:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r.family} | {r.dtype} | {r.mode} | {r.T} | {r.B} | {r.H} | {fmt(r.torch_ms, '.3f')} | "
                     f"{fmt(r.triton_ms, '.3f')} | {fmt(r.ratio, '.2f')} | {r.kernel} | {fmt(r.max_abs_err, '.2e')} | "
                     f"{fmt(r.triton_step_ms, '.3f')} | {r.skipped} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget for the whole grid")
    p.add_argument("--per-provider-s", type=float, default=0.15, help="timing budget per provider and config")
    p.add_argument("--families", nargs="*", default=["LSTM", "GRU"])
    p.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--modes", nargs="*", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.gpu needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = environment()
    print(f"bench.gpu on {env['device']}: torch {env['torch']}, triton {env['triton']}", flush=True)

    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today().isoformat()}-{slug}"

    t0 = time.monotonic()
    rows = grid(args.families, args.dtypes, args.modes)
    done: list[Row] = []

    def write(final: bool) -> None:
        # rewritten after every config, so a run killed by its outer timeout keeps what it measured
        for r in rows[len(done):] if not final else ():
            r.skipped = r.skipped or "not reached (run stopped)"
        stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]}, indent=1))
        stem.with_suffix(".md").write_text(markdown(env, rows))
        for r in rows[len(done):] if not final else ():
            r.skipped = ""
    for k, row in enumerate(rows):
        left = args.budget_s - (time.monotonic() - t0)
        need = estimate_s(row, done)
        if need > left:
            row.skipped = f"skipped: needs ~{need:.0f}s, {max(left, 0):.0f}s of the budget left"
        else:
            try:
                run_row(row, args.per_provider_s)
            except Exception as err:  # record and go on: one failing config must not lose the grid
                row.skipped = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            torch.cuda.empty_cache()
        done.append(row)
        write(final=False)
        print(f"[{k + 1}/{len(rows)} {time.monotonic() - t0:6.1f}s] {row.family} {row.dtype} {row.mode} "
              f"T{row.T} B{row.B} H{row.H}: torch {row.torch_ms} ms, triton {row.triton_ms} ms, "
              f"ratio {None if row.ratio is None else round(row.ratio, 2)} {row.skipped}", flush=True)

    write(final=True)
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    if os.environ.get("OUT"):
        for suffix in (".json", ".md"):
            Path(os.environ["OUT"], stem.name + suffix).write_bytes(stem.with_suffix(suffix).read_bytes())


if __name__ == "__main__":
    main()
