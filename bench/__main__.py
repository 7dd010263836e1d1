"""``python -m bench``: rnnfast against torch.nn and the peers a user would pick instead, on CPU or GPU.

One command writes ``<out>/<date>-<device>[-<grid>].json`` and ``.md`` and one plot per dtype and
mode (``-<mode>-<dtype>.png``). Examples::

    python -m bench                         # the CPU grid (~15 min on 2 cores), into runs/bench/
    python -m bench --quick                 # small shapes, every provider (< 2 min)
    python -m bench --device cuda --budget-s 240 --out bench/results   # the GPU grid
    python -m bench --only "GRU" --modes fwdbwd --providers torch rnnfast-cpu
    python -m bench --base bench/results/2026-11-26-cpu-cpu.json      # also print the change
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import report
from .cases import DTYPES, GRIDS, MODES
from .measure import gemm_roof, keep_freed_memory, run_grid
from .providers import default_providers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--grid", choices=sorted(GRIDS), help="default: cpu on CPU, gpu on CUDA")
    p.add_argument("--quick", action="store_true", help="the quick grid with short timings")
    p.add_argument("--providers", nargs="*", help="provider names to run (default: every one for the device)")
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--dtypes", nargs="*", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--only", help="keep cases whose label contains this text (e.g. 'GRU', 'H512')")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, help="timed rounds per provider (default 7, quick 5)")
    p.add_argument("--min-seconds", type=float, help="length of one timed batch of calls (default 0.05, quick 0.02)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget: cases estimated to overrun it are skipped")
    p.add_argument("--out", default=os.path.join("runs", "bench"), help="output folder (runs/bench)")
    p.add_argument("--base", help="an earlier results file: print (and report) the change against it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--plain-malloc", action="store_true",
                   help="leave glibc's malloc as it is (by default freed memory is kept: no page faults)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m bench --device cuda: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(args.threads)
    grid_name = args.grid or ("quick" if args.quick else "gpu" if args.device == "cuda" else "cpu")
    repeats = args.repeats or (5 if args.quick else 7)
    min_seconds = args.min_seconds or (0.02 if args.quick else 0.05)
    grid = [c for c in GRIDS[grid_name]() if c.mode in args.modes and c.dtype in args.dtypes
            and (not args.only or args.only in c.label)]
    providers = default_providers(args.device, args.threads)
    if args.providers is not None:
        unknown = set(args.providers) - {q.name for q in providers}
        if unknown:
            p.error(f"unknown providers {sorted(unknown)}; on {args.device}: {[q.name for q in providers]}")
        providers = [q for q in providers if q.name in args.providers]
    base = report.load(args.base) if args.base else None

    env = report.environment(args.device, args.threads, grid_name)
    env["allocator"] = "default (--plain-malloc)" if args.plain_malloc else keep_freed_memory()
    roofs = {d: gemm_roof(d, args.device) for d in dict.fromkeys(c.dtype for c in grid)}
    env["roof_gflop_per_s"] = {d: rate for d, (rate, _) in roofs.items()}
    env["roof_method"] = {d: how for d, (_, how) in roofs.items()}
    table = report.provider_table(providers)
    stem = report.results_stem(args.out, env, grid_name)
    print(f"bench: {len(grid)} cases on {env['device_name']} ({args.device}), {args.threads} threads; providers: "
          + ", ".join(f"{n}" if t["status"] == "available" else f"{n} (unavailable: {t['reason']})"
                      for n, t in table.items()), flush=True)

    def write(rows: list[dict]) -> None:  # after every case, so a run stopped by a timeout keeps what it measured
        report.write_json(stem + ".json", env, table, rows)
        with open(stem + ".md", "w") as f:
            f.write(report.markdown(env, table, rows, report.compare(base, rows) if base else None))

    rows = run_grid(grid, providers, args.device, repeats, min_seconds, args.budget_s, on_case=write,
                    log=lambda s: print(s, flush=True))
    # the roof again after the grid, keeping the higher: the host's slow phases must not lower it
    env["roof_gflop_per_s"] = {d: max(v, gemm_roof(d, args.device)[0]) for d, v in env["roof_gflop_per_s"].items()}
    write(rows)
    print()
    print(open(stem + ".md").read())
    written = [stem + ".json", stem + ".md"] + ([] if args.no_plots else report.plot(env, rows, stem))
    print("wrote", ", ".join(written))


if __name__ == "__main__":
    main()
