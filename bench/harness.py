"""Timing harness: every rnnfast backend against torch.nn, side by side in one run.

Each configuration builds a torch.nn layer and, for every provider, an rnnfast
twin with the same weights. Providers are timed in interleaved rounds (torch,
then each backend, then torch again, ...) so machine noise hits them alike;
a provider's figure is the median over rounds, and ratios are torch's median
over the provider's (above 1 means rnnfast is faster).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import rnnfast

MODES = ("fwd", "fwdbwd", "decode")


@dataclass(frozen=True)
class Config:
    """One benchmark shape. ``mode``: fwd (no grad), fwdbwd, or decode (T=1, B=1 steps)."""

    family: str  # "LSTM", "GRU" or "RNN"
    mode: str
    T: int
    B: int
    I: int
    H: int
    layers: int = 1

    @property
    def label(self) -> str:
        shape = f"L{self.layers} I{self.I} H{self.H}" if self.mode == "decode" else \
            f"T{self.T} B{self.B} I{self.I} H{self.H}" + (f" L{self.layers}" if self.layers > 1 else "")
        return f"{self.family} {self.mode} {shape}"


def cpu_grid() -> list[Config]:
    """The default CPU grid: the issue targets, PyTorch's fastrnns shape, smaller and larger B and H."""
    grid = []
    for mode in ("fwd", "fwdbwd"):
        grid += [
            Config("LSTM", mode, 100, 64, 256, 256),
            Config("GRU", mode, 100, 64, 256, 256),
            Config("GRU", mode, 100, 32, 64, 128),
            Config("LSTM", mode, 100, 32, 64, 128),
            Config("RNN", mode, 100, 64, 256, 256),
            Config("LSTM", mode, 100, 8, 256, 256),
            Config("LSTM", mode, 100, 256, 256, 256),
            Config("LSTM", mode, 100, 64, 512, 512),  # fastrnns default
            Config("LSTM", mode, 100, 64, 256, 256, layers=2),
        ]
    grid += [
        Config("LSTM", "decode", 1, 1, 512, 512, layers=2),
        Config("LSTM", "decode", 1, 1, 128, 128, layers=2),
        Config("GRU", "decode", 1, 1, 256, 256),
        Config("LSTM", "decode", 1, 1, 1024, 1024),
    ]
    return grid


def quick_grid() -> list[Config]:
    """A few small shapes, for a smoke run."""
    return [
        Config("LSTM", "fwd", 20, 8, 32, 32),
        Config("GRU", "fwdbwd", 20, 8, 32, 32),
        Config("LSTM", "decode", 1, 1, 64, 64, layers=2),
    ]


GRIDS: dict[str, Callable[[], list[Config]]] = {"cpu": cpu_grid, "quick": quick_grid}


def _make_step(module: torch.nn.Module, cfg: Config, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """A closure running one measured unit of work for ``cfg`` on ``module``."""
    g = torch.Generator().manual_seed(0)
    lead = cfg.layers
    if cfg.mode == "decode":
        x = torch.randn(1, 1, cfg.I, generator=g).to(device, dtype)
        state = {"hx": None}

        def decode() -> None:
            with torch.no_grad():
                _, state["hx"] = module(x, state["hx"])

        return decode
    x = torch.randn(cfg.T, cfg.B, cfg.I, generator=g).to(device, dtype)
    h0 = torch.zeros(lead, cfg.B, cfg.H, device=device, dtype=dtype)
    hx = (h0, h0.clone()) if cfg.family == "LSTM" else h0
    if cfg.mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                module(x, hx)

        return fwd
    xg = x.clone().requires_grad_()
    grad_out = torch.randn(cfg.T, cfg.B, cfg.H, generator=g).to(device, dtype)

    def fwdbwd() -> None:
        out, _ = module(xg, hx)
        out.backward(grad_out)
        for p in module.parameters():
            p.grad = None
        xg.grad = None

    return fwdbwd


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calibrate(step: Callable[[], None], device: str, min_seconds: float) -> int:
    """Iterations per measurement so one measurement lasts about ``min_seconds``."""
    step()  # warm-up (and first-call setup)
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, math.ceil(min_seconds / once))


def time_config(
    cfg: Config,
    backends: list[str],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 7,
    min_seconds: float = 0.05,
) -> dict:
    """Median seconds per unit (a call, or a decode step) for torch.nn and each backend."""
    torch.manual_seed(0)
    torch_cls = getattr(torch.nn, cfg.family)
    ref = torch_cls(cfg.I, cfg.H, num_layers=cfg.layers).to(device, dtype)
    modules = {"torch": ref}
    for name in backends:
        m = getattr(rnnfast, cfg.family)(cfg.I, cfg.H, num_layers=cfg.layers, backend=name).to(device, dtype)
        m.load_state_dict(ref.state_dict())
        modules[name] = m
    steps = {name: _make_step(m, cfg, device, dtype) for name, m in modules.items()}
    inner = {name: _calibrate(step, device, min_seconds) for name, step in steps.items()}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved: every provider once per round
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    medians = {name: statistics.median(s) for name, s in samples.items()}
    return {
        **asdict(cfg),
        "label": cfg.label,
        "seconds": medians,
        "speedup_vs_torch": {n: medians["torch"] / medians[n] for n in backends},
    }


def environment(device: str, dtype: torch.dtype, threads: int) -> dict:
    """Where and with what the numbers were taken."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device,
        "device_name": gpu or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "rnnfast": rnnfast.__version__,
        "python": platform.python_version(),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "backends_available": rnnfast.available_backends(),
    }


def markdown(env: dict, rows: list[dict], backends: list[str]) -> str:
    """A table of median times and speed-ups against torch.nn."""
    head = (f"rnnfast bench — {env['device_name']} ({env['device']}), {env['dtype']}, {env['threads']} threads, "
            f"torch {env['torch']}, commit {env['git_commit']}, {env['date']}\n\n"
            "Median of interleaved repeats; fwd/fwdbwd: ms per call, decode: ms per step (T=1, B=1). "
            "Speed-up = torch time / rnnfast time (>1: rnnfast faster).\n\n")
    cols = ["config", "torch ms"] + [f"{b} ms" for b in backends] + [f"{b} ×" for b in backends]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["label"], f"{r['seconds']['torch'] * 1e3:.3f}"]
        cells += [f"{r['seconds'][b] * 1e3:.3f}" for b in backends]
        cells += [f"{r['speedup_vs_torch'][b]:.2f}" for b in backends]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_results(path_stem: str, env: dict, rows: list[dict], backends: list[str]) -> tuple[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md``; returns both paths."""
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    with open(path_stem + ".json", "w") as f:
        json.dump({"environment": env, "backends": backends, "results": rows}, f, indent=1)
    with open(path_stem + ".md", "w") as f:
        f.write(markdown(env, rows, backends))
    return path_stem + ".json", path_stem + ".md"


def default_backends(device: str) -> list[str]:
    """Every backend usable on ``device`` here, interpreted Triton excluded."""
    names = []
    for name in rnnfast.available_backends():
        if name == "triton" and (device == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        if name == "cpu" and device != "cpu":
            continue
        names.append(name)
    return names


def run(grid: list[Config], backends: list[str], device: str, dtype: torch.dtype, threads: int, repeats: int,
        log: Optional[Callable[[str], None]] = print) -> tuple[dict, list[dict]]:
    """Time every config of ``grid``; returns (environment, rows)."""
    torch.set_num_threads(threads)
    env = environment(device, dtype, threads)
    rows = []
    for k, cfg in enumerate(grid):
        row = time_config(cfg, backends, device, dtype, repeats)
        rows.append(row)
        if log:
            ratios = "  ".join(f"{b} {row['speedup_vs_torch'][b]:.2f}x" for b in backends)
            log(f"[{k + 1}/{len(grid)}] {cfg.label}: torch {row['seconds']['torch'] * 1e3:.3f} ms  {ratios}")
    return env, rows
