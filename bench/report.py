"""Results: the environment, the JSON file, the markdown report, the plots and ``--base`` comparisons."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import subprocess
from collections import defaultdict
from typing import Optional

import torch

import rnnfast

from .providers import Provider

SCHEMA = "rnnfast-bench/2"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # not installed, or broken: the providers table says why
        return None


def environment(device: str, threads: int, grid: str) -> dict:
    """Where and with what the numbers were taken."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "grid": grid,
        "torch": torch.__version__,
        "rnnfast": rnnfast.__version__,
        "python": platform.python_version(),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "rnnfast_backends": rnnfast.available_backends(),
        "versions": {m: _version(m) for m in ("onnxruntime", "triton", "flashrnn", "haste_pytorch")},
    }
    if device == "cpu" and "cpu" in env["rnnfast_backends"]:  # what rnnfast's products run on here
        from rnnfast import _C

        f32 = _C.product_isa("float32")
        widened = f"none: float32 {f32} on widened copies" if f32 else "none (stepwise loop)"
        env["rnnfast_products"] = {"float32": f32 or "none (stepwise loop)",
                                   "bfloat16": _C.product_isa("bfloat16") or widened}
    if device == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   capability=".".join(map(str, torch.cuda.get_device_capability())), tf32=False)
    return env


def results_stem(out_dir: str, env: dict, grid: str) -> str:
    """``<out>/<date>-<device>[-<grid>]``: the device is the GPU's name on GPU, ``cpu`` on CPU; a later
    run on the same day gets ``-2``, ``-3``, ... rather than overwriting an earlier (committed) one."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") if env["device"] == "cuda" else "cpu"
    tag = "" if grid == env["device"] or (grid == "gpu" and env["device"] == "cuda") else f"-{grid}"
    stem = os.path.join(out_dir, f"{datetime.date.today().isoformat()}-{slug}{tag}")
    run = 1
    while any(os.path.exists(f"{stem}{'' if run == 1 else f'-{run}'}.{ext}") for ext in ("json", "md")):
        run += 1
    return stem if run == 1 else f"{stem}-{run}"


def provider_table(providers: list[Provider]) -> dict:
    """Each provider's description and whether it runs here (with the reason when not)."""
    out = {}
    for p in providers:
        why = p.unavailable()
        out[p.name] = {"what": p.what, "status": "available" if why is None else "unavailable", "reason": why or ""}
    return out


def write_json(path: str, env: dict, providers: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"schema": SCHEMA, "environment": env, "providers": providers, "results": rows}, f, indent=1)


def load(path: str) -> dict:
    """A results file in this schema, or converted from the 2026-11 ones (``python -m bench``'s
    ``environment/backends/results`` with seconds per backend; ``bench.gpu``'s ``env/rows``)."""
    with open(path) as f:
        data = json.load(f)
    if data.get("schema") == SCHEMA:
        return data
    rows = []
    if "results" in data and "backends" in data:  # the 2026-11 CPU harness: one row per config
        dtype = data["environment"].get("dtype", "float32")
        for r in data["results"]:
            for name, secs in r["seconds"].items():
                rows.append({"provider": name if name == "torch" else f"rnnfast-{name}", "label": r["label"],
                             "dtype": dtype, "status": "ok", "p50_ms": secs * 1e3})
        return {"schema": "2026-11 cpu", "environment": data["environment"], "providers": {}, "results": rows}
    if "rows" in data and "env" in data:  # the 2026-11 GPU harness (I = H, one layer)
        for r in data["rows"]:
            label = f"{r['family']} {r['mode']} T{r['T']} B{r['B']} I{r['H']} H{r['H']}"
            for key, name in (("torch_ms", "torch"), ("triton_ms", "rnnfast-triton"),
                              ("triton_step_ms", "rnnfast-triton-step")):
                if r.get(key) is not None:
                    rows.append({"provider": name, "label": label, "dtype": r["dtype"], "status": "ok",
                                 "p50_ms": r[key]})
        return {"schema": "2026-11 gpu", "environment": data["env"], "providers": {}, "results": rows}
    raise ValueError(f"{path}: not a results file this harness can read (no schema, results or rows)")


def compare(base: dict, rows: list[dict]) -> str:
    """A markdown table of median times now against ``base`` (matched by shape, dtype and provider)."""
    old = {(r["label"], r["dtype"], r["provider"]): r["p50_ms"] for r in base["results"] if r["status"] == "ok"}
    lines = [f"Against {base['environment'].get('date', '?')} ({base['schema']}, commit "
             f"{base['environment'].get('git_commit')}): median ms, change = base / now (>1: faster now).", "",
             "| config | dtype | provider | base ms | now ms | change |", "|---|---|---|---|---|---|"]
    matched = 0
    for r in rows:
        key = (r["label"], r["dtype"], r["provider"])
        if r["status"] == "ok" and key in old:
            matched += 1
            lines.append(f"| {r['label']} | {r['dtype']} | {r['provider']} | {old[key]:.3f} | {r['p50_ms']:.3f} | "
                         f"{old[key] / r['p50_ms']:.2f} |")
    if not matched:
        lines.append("| (no config, dtype and provider in common) | | | | | |")
    return "\n".join(lines) + "\n"


def _sections(rows: list[dict]) -> dict:
    sec = defaultdict(list)
    for r in rows:
        sec[(r["dtype"], r["mode"])].append(r)
    order = {"fwd": 0, "fwdbwd": 1, "decode": 2}
    return dict(sorted(sec.items(), key=lambda kv: (kv[0][0] != "float32", kv[0][0], order[kv[0][1]])))


MODE_TEXT = {"fwd": "forward, no autograd (ms per call)", "fwdbwd": "forward + backward (ms per call)",
             "decode": "decode, one step with the state carried, T=1 (ms per step)"}


def markdown(env: dict, providers: dict, rows: list[dict], base: Optional[str] = None) -> str:
    """The report: environment, providers (with why one does not run), then per dtype and mode a table
    of median ms with the speed-up over torch.nn, p20-p80, peak memory and error."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    gpu = f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, TF32 off" if env["device"] == "cuda" else ""
    out = [f"# rnnfast bench: {env['device_name']} ({env['device']})", "",
           f"{env['date']}, commit {env['git_commit']}, grid `{env['grid']}`, {env['threads']} threads "
           f"({env['cpu_count']} CPUs), torch {env['torch']}{gpu}, {versions}."
           + "".join(f" rnnfast's {d} products: {isa}." for d, isa in env.get("rnnfast_products", {}).items())
           + (f" Host allocator: {env['allocator']}." if "allocator" in env else ""), "",
           "Each cell: median ms (speed-up over torch.nn at the same dtype, >1 faster: the median over rounds "
           "of torch's time / the provider's time in the same round). "
           "Timing: interleaved rounds of calibrated batches of calls; p20-p80 of times and speed-ups in the JSON. "
           "Peak memory: what one call allocates beyond the model and input. "
           "Error: max |output - torch.nn float32 output| on the same weights and input.", "",
           "## Providers", "", "| provider | what | here |", "|---|---|---|"]
    for name, p in providers.items():
        out.append(f"| {name} | {p['what']} | {'yes' if p['status'] == 'available' else 'no: ' + p['reason']} |")
    for (dtype, mode), sec in _sections(rows).items():
        labels = list(dict.fromkeys(r["label"] for r in sec))
        names = [n for n in providers if any(r["provider"] == n for r in sec)]
        cell = {(r["label"], r["provider"]): r for r in sec}
        out += ["", f"## {dtype}, {MODE_TEXT[mode]}", ""]
        for title, fmt in (("time", _time_cell), ("peak memory, MiB", _mem_cell), ("max abs error", _err_cell)):
            if title != "time":
                out += ["", f"{title}:", ""]
            out += ["| config | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for label in labels:
                base_row = cell.get((label, "torch"))
                out.append(f"| {label} | " + " | ".join(fmt(cell.get((label, n)), base_row) for n in names) + " |")
        roof = env.get("roof_gflop_per_s", {}).get(dtype)
        if roof and mode != "decode":
            out += _roof_table(roof, env["roof_method"][dtype], labels, names, cell)
        ran = {n: sorted({f"{r['ran_on']} ({r['out_dtype']} out)" for r in sec
                          if r["provider"] == n and r["status"] == "ok"}) for n in names}
        out += ["", "Ran on: " + "; ".join(f"{n}: {', '.join(v)}" for n, v in ran.items() if v) + "."]
        notes = sorted({(r["provider"], r["status"], r["reason"]) for r in sec if r["status"] != "ok"})
        if notes:
            out += ["", "Not timed here:"] + [f"- {p}: {s}, {why}" for p, s, why in notes]
    if base:
        out += ["", "## Change against an earlier run", "", base]
    return "\n".join(out) + "\n"


def _roof_table(roof: float, method: str, labels: list[str], names: list[str], cell: dict) -> list[str]:
    """GEMM GFLOP/s of each provider as a share of the roof, and how much faster than torch.nn a
    provider could be at most if its GEMMs ran at the roof and the rest cost nothing (roof / torch)."""
    out = ["", f"GEMM work per second, GFLOP/s (share of the roof: {roof:.0f} GFLOP/s, {method}, measured "
           "in this run; int8 providers count the float work they replace). Last column: roof / torch, "
           "the most any provider can gain on torch.nn while it does the same float work:", "",
           "| config | " + " | ".join(names) + " | roof / torch |", "|---" * (len(names) + 2) + "|"]
    for label in labels:
        rates = [cell.get((label, name)) for name in names]
        cells = [f"{r['gflop_per_s']:.3g} ({r['gflop_per_s'] / roof:.0%})" if r and r.get("gflop_per_s") else ""
                 for r in rates]
        torch_row = cell.get((label, "torch"))
        head = f"{roof / torch_row['gflop_per_s']:.2f}×" if torch_row and torch_row.get("gflop_per_s") else ""
        out.append(f"| {label} | " + " | ".join(cells) + f" | {head} |")
    return out


def _time_cell(r: Optional[dict], base: Optional[dict]) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    if "speedup" in r:  # paired per round (this harness since 2026-12-06)
        ratio = f" ({r['speedup']:.2f}×)"
    else:  # torch.nn's own cell, and older files: the ratio of the two medians
        ratio = f" ({base['p50_ms'] / r['p50_ms']:.2f}×)" if base and base["status"] == "ok" else ""
    return f"{r['p50_ms']:.3f}{ratio}"


def _mem_cell(r: Optional[dict], _: Optional[dict]) -> str:
    if r is None or r["status"] != "ok" or r.get("peak_mem_bytes") is None:
        return "" if r is None or r["status"] != "ok" else "n/a"
    return f"{r['peak_mem_bytes'] / 2 ** 20:.2f}"


def _err_cell(r: Optional[dict], _: Optional[dict]) -> str:
    if r is None or r["status"] != "ok" or r.get("max_abs_err") is None:
        return "" if r is None or r["status"] != "ok" else "n/a"
    return f"{r['max_abs_err']:.1e}"


def _sweep(sec: list[dict], axis: str) -> list[dict]:
    """The rows of the largest group that varies only ``axis`` ("B", or "H" with I = H)."""
    fixed = ("family", "T", "layers") + (("I", "H") if axis == "B" else ("B",))
    groups = defaultdict(list)
    for r in sec:
        if r["status"] == "ok" and (axis == "B" or r["I"] == r["H"]):
            groups[tuple(r[k] for k in fixed)].append(r)
    best = max(groups.values(), key=lambda g: len({r[axis] for r in g}), default=[])
    return best if len({r[axis] for r in best}) >= 3 else []


def plot(env: dict, rows: list[dict], stem: str) -> list[str]:
    """One figure per dtype and mode: tokens/s against batch size and against hidden size, a line per
    provider, headed by device, versions and commit. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (dtype, mode), sec in _sections(rows).items():
        sweeps = [(axis, _sweep(sec, axis)) for axis in ("B", "H")]
        sweeps = [(a, s) for a, s in sweeps if s]
        if not sweeps:
            continue
        fig, axes = plt.subplots(1, len(sweeps), figsize=(6.2 * len(sweeps), 4.6), squeeze=False)
        for ax, (axis, pts) in zip(axes[0], sweeps):
            for name in dict.fromkeys(r["provider"] for r in pts):
                line = sorted((r[axis], r["tokens_per_s"]) for r in pts if r["provider"] == name)
                ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=name)
            r0 = pts[0]
            fixed = f"T={r0['T']}, I=H={r0['H']}" if axis == "B" else f"T={r0['T']}, B={r0['B']}, I=H"
            ax.set_title(f"{r0['family']} vs {'batch' if axis == 'B' else 'hidden'} size ({fixed})", fontsize=10)
            ax.set_xlabel("batch size B" if axis == "B" else "hidden size H")
            ax.set_ylabel("throughput (tokens/s = T·B / median time)")
            ax.set_xscale("log", base=2)
            ticks = sorted({r[axis] for r in pts})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{env['device_name']} ({env['device']}, {env['threads']} threads), {dtype}, {MODE_TEXT[mode]}\n"
                     f"torch {env['torch']}, rnnfast {env['rnnfast']} @ {env['git_commit']}, {env['date']}",
                     fontsize=9)
        fig.tight_layout()
        path = f"{stem}-{mode}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
