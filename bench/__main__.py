"""``python -m bench``: time rnnfast's backends against torch.nn and write the results.

Examples::

    python -m bench                        # CPU grid, all usable backends, 2 threads
    python -m bench --grid quick           # a smoke run
    python -m bench --only "GRU" --modes fwdbwd --backends cpu
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .harness import GRIDS, MODES, default_backends, markdown, run, write_results

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backends", nargs="*", help="rnnfast backends to time (default: all usable here)")
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--only", help="keep configs whose label contains this text (e.g. 'GRU', 'H512')")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", help="results path stem (default: bench/results/<date>-<device>)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backends = args.backends if args.backends is not None else default_backends(args.device)
    grid = [c for c in GRIDS[args.grid]() if c.mode in args.modes and (not args.only or args.only in c.label)]
    env, rows = run(grid, backends, args.device, DTYPES[args.dtype], args.threads, args.repeats)
    print()
    print(markdown(env, rows, backends))
    if not args.no_write:
        stem = args.out or os.path.join(
            os.path.dirname(__file__), "results", f"{time.strftime('%Y-%m-%d')}-{args.device}-{args.grid}")
        for path in write_results(stem, env, rows, backends):
            print("wrote", path)


if __name__ == "__main__":
    main()
