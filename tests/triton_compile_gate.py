"""Compile gate: every persistent-kernel variant ``"auto"`` can pick on an H100/H200,
compiled for sm_90 on a machine without a GPU, must use no stack (no spills), fit the
227 KB of shared memory, and load ``W_hh`` outside the time loop.

``python tests/triton_compile_gate.py [--full]`` prints the table (the reduced CI
subset without ``--full``); ``tests/test_triton_compile.py`` asserts it. Results are
cached under ``~/.cache/rnnfast-compile-gate`` keyed by the kernel source, so an
unchanged kernel is not recompiled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnnfast.kernels import choose_kernel, persistent
from rnnfast.kernels.utils import LSTM, GRU, NUM_GATES, NUM_SAVED, dot_block

SHARED_LIMIT = 227 * 1024  # H100/H200 shared memory per block (opt-in maximum)
TARGET = GPUTarget("cuda", 90, 128)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
CACHE = Path(os.environ.get("RNNFAST_COMPILE_GATE_CACHE", Path.home() / ".cache" / "rnnfast-compile-gate"))
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# precision variants on an H100/H200: bfloat16, float32 with TF32 off (3xTF32 dots) and on
PRECISIONS = [(torch.bfloat16, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32")]
HIDDEN = [128, 256, 512, 1024]
BATCH = [1, 16, 256]


class Variant(NamedTuple):
    kernel: str  # "fwd" or "bwd"
    mode: int
    dtype: torch.dtype
    precision: str
    H: int
    B: int

    @property
    def name(self) -> str:
        mode = {LSTM: "LSTM", GRU: "GRU"}.get(self.mode, str(self.mode))
        return f"{self.kernel}-{mode}-{TYPES[self.dtype]}-{self.precision}-H{self.H}-B{self.B}"


class Result(NamedTuple):
    name: str
    block_b: int
    block_u: int
    num_warps: int
    w_resident: bool
    registers: int
    stack: int
    shared: int
    w_loads_before: int
    w_loads_in_loop: int
    seconds: float  # wall time of the compile
    cpu_seconds: float  # CPU time of the compile (this process and ptxas)

    @property
    def ok(self) -> bool:
        """No stack, shared memory within the limit; a resident slice is loaded before the
        time loop and never inside it (a streamed one is read inside by design)."""
        placed = self.w_loads_before > 0 and self.w_loads_in_loop == 0 if self.w_resident else True
        return self.stack == 0 and self.shared <= SHARED_LIMIT and placed


def variants(full: bool) -> list[Variant]:
    """The gate's grid: ``full`` is the issue's (LSTM/GRU x bf16/fp32 TF32 off/on x hidden
    128-1024 x batch 1/16/256, forward and backward; B 1 and 16 share a configuration and
    compile once; cells where ``"auto"`` takes the step kernels, batch 256 at hidden 512 and
    1024, are left out). The CI subset (each compile takes 1-3 s of CPU): a resident forward
    (bf16 H 512), a resident backward (bf16 H 256) and a streamed forward (GRU, float32
    TF32 off, H 1024)."""
    if not full:
        return [Variant("fwd", LSTM, torch.bfloat16, "ieee", 512, 16), Variant("bwd", LSTM, torch.bfloat16, "ieee", 256, 16),
                Variant("fwd", GRU, torch.float32, "tf32x3", 1024, 16)]
    return [Variant(kernel, mode, dtype, precision, H, B) for kernel in ("fwd", "bwd") for mode in (LSTM, GRU)
            for dtype, precision in PRECISIONS for H in HIDDEN for B in BATCH
            if choose_kernel("auto", mode, H, H, B, dtype) == "persistent"]


def _source(v: Variant, cfg: persistent.PersistentConfig) -> ASTSource:
    ptr = "*" + TYPES[v.dtype]
    acc = "*fp32"
    consts = dict(MODE=v.mode, NG=NUM_GATES[v.mode], NS=NUM_SAVED[v.mode], IS_FP64=False, PRECISION=v.precision,
                  REVERSE=False, HAS_BS=False, SYNC=True, W_RESIDENT=cfg.w_resident, BLOCK_B=cfg.block_b,
                  BLOCK_U=cfg.block_u, BLOCK_K=dot_block(v.H), BLOCK_KS=cfg.block_ks)
    ints = dict(T="i32", B="i32", H="i32", k_begin="i32", k_end="i32")
    if v.kernel == "fwd":
        fn = persistent.rnn_fwd_persistent_kernel
        sig = dict(gx=ptr, w_hh=ptr, b_hh=ptr, bs="constexpr", hs=ptr, cs=acc, g=acc, flags="*i32", **ints)
        consts.update(HAS_BIAS=True, SAVE=True, bs=None)
        if v.mode != LSTM:
            sig["cs"] = "constexpr"
            consts["cs"] = None
    else:
        fn = persistent.rnn_bwd_persistent_kernel
        sig = dict(dout=ptr, g=acc, hs=ptr, cs=acc, w_hh=ptr, bs="constexpr", dgi=ptr, dgh=ptr, dh=acc, dc=acc,
                   flags="*i32", **ints)
        consts["bs"] = None
        if v.mode != LSTM:
            sig["cs"] = sig["dc"] = "constexpr"
            consts["cs"] = consts["dc"] = None
    sig.update({k: "constexpr" for k in consts if k not in sig})
    return ASTSource(fn, sig, consts)


def w_loads_in_loop(ttgir: str) -> tuple[int, int]:
    """``(before, inside)``: how many ``tt.load``s of ``W_hh`` the TTGIR has before and inside the
    time loop. A pointer derives from ``W_hh`` when its definition (not a load: loaded values
    are data) uses ``%w_hh`` or a pointer so derived; the time loop is the ``scf.for`` over
    ``%k``, up to its closing brace."""
    derived = {"%w_hh"}
    lines = ttgir.splitlines()
    defn = re.compile(r"^\s*(%[\w.#:]+(?:, %[\w.#:]+)*) = (.*)$")
    for _ in range(3):  # loop-carried values reach a fixed point within a few passes
        for line in lines:
            m = defn.match(line)
            is_ptr = "!tt.ptr" in m.group(2) and not m.group(2).startswith("tt.load") if m else False
            if is_ptr and derived & set(re.findall(r"%[\w.]+", m.group(2))):
                derived.update(n.split(":")[0] for n in m.group(1).split(", "))
    before = inside = depth = 0
    in_loop = done = False
    for line in lines:
        if not in_loop and not done and re.search(r"scf\.for %k ", line):
            in_loop, depth = True, 0
        is_w_load = "tt.load" in line and derived & set(re.findall(r"%[\w.]+", line.split("tt.load", 1)[1]))
        if in_loop:
            inside += bool(is_w_load)
            depth += line.count("{") - line.count("}")
            if depth <= 0 and "}" in line:
                in_loop, done = False, True
        elif not done:
            before += bool(is_w_load)
    return before, inside


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, stack bytes, shared bytes)`` of the one function in ``cubin``, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    field = lambda key: int(re.search(rf"{key}[:=](\d+)", out).group(1))  # noqa: E731
    return field("REG"), field("STACK"), field("SHARED")


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def check(v: Variant) -> Result:
    """Compile one variant for sm_90 (or read the cached result) and measure it."""
    cfg = persistent.persistent_config(v.mode, v.H, v.B, v.dtype, v.precision, backward=v.kernel == "bwd")
    src = _source(v, cfg)
    key = hashlib.sha256(f"{src.hash()}-{cfg}-{triton.__version__}".encode()).hexdigest()[:24]
    cached = CACHE / f"{key}.json"
    if cached.exists():
        return Result(**{**json.loads(cached.read_text()), "name": v.name})
    t0, c0 = time.perf_counter(), _cpu_seconds()
    compiled = triton.compile(src, target=TARGET, options={"num_warps": cfg.num_warps, "num_stages": 1})
    regs, stack, shared = _resources(compiled.asm["cubin"])
    shared = max(shared, compiled.metadata.shared)
    res = Result(v.name, cfg.block_b, cfg.block_u, cfg.num_warps, cfg.w_resident, regs, stack, shared,
                 *w_loads_in_loop(compiled.asm["ttgir"]), round(time.perf_counter() - t0, 1),
                 round(_cpu_seconds() - c0, 1))
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(res._asdict()))
    return res


def table(results: list[Result]) -> str:
    head = ("| variant | BLOCK_B | BLOCK_U | warps | W resident | regs | stack B | shared B | W loads before loop "
            "| W loads in loop | compile s (CPU) | ok |")
    rows = [head, "|" + "---|" * 12]
    for r in results:
        rows.append(f"| {r.name} | {r.block_b} | {r.block_u} | {r.num_warps} | {r.w_resident} | {r.registers} | "
                    f"{r.stack} | {r.shared} | {r.w_loads_before} | {r.w_loads_in_loop} | {r.seconds} ({r.cpu_seconds}) | "
                    f"{'yes' if r.ok else 'NO'} |")
    return "\n".join(rows)


def main() -> int:
    """Print the gate's table; exit status 1 when a variant fails it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the issue's whole grid (else the CI subset)")
    args = ap.parse_args()
    results = []
    for v in variants(args.full):
        results.append(check(v))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
