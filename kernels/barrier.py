"""Microbenchmark of the persistent kernels' per-step barrier (GPU only):
``python -m rnnfast.kernels.barrier [--out FILE]`` times a cooperative grid of P
programs (8-132) that do nothing but wait for and signal each step, as the
persistent kernels do (:func:`~.persistent.step_wait`, :func:`~.persistent.step_done`),
and prints microseconds per step for each P (one batch group: every program waits on all).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from .persistent import step_done, step_wait


@triton.jit
def barrier_kernel(flags, T):
    n_u = tl.num_programs(0)
    for k in range(0, T):
        step_wait(flags, k, 1, 0, n_u, True)
        step_done(flags, k, 1, 0, True)


def time_barrier(programs: int, steps: int = 1000, repeats: int = 5) -> float:
    """Median microseconds per step of a barrier across ``programs`` programs."""
    flags = torch.zeros(steps, dtype=torch.int32, device="cuda")
    times = []
    for _ in range(repeats + 1):
        flags.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        barrier_kernel[(programs,)](flags, steps, num_warps=4, launch_cooperative_grid=True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / steps)
    assert int(flags[-1]) == programs, "barrier counters are off"
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description="per-step barrier of the persistent kernels, us per step")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    rows = []
    for p in (8, 16, 32, 64, 96, 132):
        us = time_barrier(p)
        rows.append({"programs": p, "us_per_step": round(us, 3)})
        print(f"programs {p:4d}: {us:7.3f} us/step", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "barrier": rows}, f, indent=1)


if __name__ == "__main__":
    main()
