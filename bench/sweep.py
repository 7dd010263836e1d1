"""``python -m bench.sweep``: rnnfast against torch.nn on random module configurations, off the grid.

The grid (``python -m bench``) times named shapes; users run others. This draws ``--count`` random
configurations of every constructor option the grid leaves fixed (bidirectional, proj_size,
batch_first, bias, nonlinearity, packed input, odd sizes) and of the call (initial states given or
not: hx None lets the first step skip its recurrent product), a fifth of them as cells stepped in a
Python loop, builds torch.nn and rnnfast (backend
``--backend``) on the same weights, in ``--precision`` (float32; bfloat16, float16, float64: both
modules, inputs and states cast to it; autocast: float32 modules called under ``torch.autocast("cpu",
dtype=torch.bfloat16)``), and times both side by side: interleaved rounds of calibrated
batches, the speed-up being the median of the per-round ratios (``measure.paired_speedup``). The
table lists the slowest first. Examples::

    python -m bench.sweep                          # 60 configurations, seed 0 (~5 min on 2 cores)
    python -m bench.sweep --seed 3 --count 200 --modes fwd
    python -m bench.sweep --precision autocast     # bfloat16 products, against torch.nn's under autocast
    python -m bench.sweep --precision float16 --max-cost 1e9   # torch.nn's float16 CPU layers are slow
    python -m bench.sweep --out bench/results      # a committed run
    python -m bench.sweep --rerun runs/bench/2026-12-06-cpu-sweep.json --below 1.0   # its slow ones again
"""

from __future__ import annotations

import argparse
import json
import os
import random
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import rnnfast

from . import report
from .cases import Case
from .measure import keep_freed_memory, paired_speedup, time_batch


@dataclass(frozen=True)
class Config(Case):
    """A grid case (``mode`` ``fwd``: eval, no autograd, or ``fwdbwd``; ``dtype`` a torch dtype's name) with
    the options the grid leaves at torch.nn's defaults."""

    bidirectional: bool = False
    batch_first: bool = False
    packed: bool = False
    options: dict = field(default_factory=dict)  # bias, nonlinearity, proj_size
    input_grad: bool = True  # fwdbwd: the input needs a gradient (an embedding's output), else data
    states: bool = False  # random initial states given (a decoder's, truncated BPTT's), else hx None
    autocast: bool = False  # bfloat16 by autocast over float32 modules, inputs and states, not by casting them

    @property
    def label(self) -> str:
        flags = [f"L{self.layers}"] if self.layers > 1 else []
        named = (("bidir", self.bidirectional), ("batch_first", self.batch_first), ("packed", self.packed),
                 ("data-input", self.mode == "fwdbwd" and not self.input_grad), ("hx", self.states))
        flags += [n for n, on in named if on]
        flags += [f"{k}={v}" for k, v in sorted(self.options.items())]
        flags += {"float32": [], "bfloat16": ["bf16"], "float16": ["fp16"], "float64": ["f64"],
                  "autocast": ["autocast"]}[self.precision]
        return f"{self.family} {self.mode} T{self.T} B{self.B} I{self.I} H{self.H}" + "".join(f" {f}" for f in flags)

    @property
    def precision(self) -> str:
        """``--precision``'s name for how the configuration runs (see :data:`PRECISIONS`)."""
        return "autocast" if self.autocast else self.dtype

    @property
    def cost(self) -> float:
        """Multiply-adds of one call, roughly: to keep a sweep within minutes."""
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[self.family.removesuffix("Cell")]
        dirs = 2 if self.bidirectional else 1
        return (self.T * max(self.B, 8) * gates * self.H * (self.I + self.H * (2 * self.layers - 1)) * dirs
                * (3 if self.mode == "fwdbwd" else 1))


def draw(rng: random.Random, modes: tuple[str, ...]) -> Config:
    """One random configuration."""
    family = rng.choice(("LSTM", "GRU", "RNN"))
    H = rng.choice((8, 33, 64, 96, 128, 200, 256, 384, 512, 768, 1024))
    layers = rng.choice((1, 1, 2, 3))
    options: dict[str, Any] = {}
    if rng.random() < 0.15:
        options["bias"] = False
    if family == "RNN" and rng.random() < 0.4:
        options["nonlinearity"] = "relu"
    if family == "LSTM" and rng.random() < 0.2:
        options["proj_size"] = max(1, H // rng.choice((2, 4)))
    T = rng.choice((1, 2, 5, 17, 50, 100, 200))
    return Config(family, rng.choice(modes), T, rng.choice((1, 2, 5, 8, 16, 32, 48, 64, 128, 256)),
                  rng.choice((1, 13, 64, 128, 256, 300, 512)), H, layers, bidirectional=rng.random() < 0.3,
                  batch_first=rng.random() < 0.3, packed=T > 1 and rng.random() < 0.2, options=options,
                  input_grad=rng.random() < 0.5)


def drawn(seed: int, count: int, modes: list[str], max_cost: float, precision: str = "float32") -> list[Config]:
    """``count`` random configurations of at most ``max_cost`` multiply-adds a call, in ``precision``;
    whether each gives initial states comes from a stream of its own, so that a seed draws the shapes it
    always drew (in every precision)."""
    low = {"dtype": "bfloat16" if precision == "autocast" else precision, "autocast": precision == "autocast"}
    rng, states, cells = random.Random(seed), random.Random(f"{seed}-states"), random.Random(f"{seed}-cells")
    configs: list[Config] = []
    while len(configs) < count:
        cfg = draw(rng, tuple(modes))
        if cfg.cost <= max_cost:
            cfg = replace(cfg, states=states.random() < 0.3, **low)
            configs.append(as_cell(cfg) if cells.random() < 0.2 else cfg)
    return configs


def as_cell(cfg: Config) -> Config:
    """The configuration's cell: T steps of LSTMCell, GRUCell or RNNCell in a Python loop, the state
    carried (a decoder with attention steps one so); the layer-only options dropped."""
    options = {k: v for k, v in cfg.options.items() if k != "proj_size"}
    return replace(cfg, family=cfg.family + "Cell", layers=1, bidirectional=False, batch_first=False, packed=False,
                   options=options)


def rerun(path: str, below: Optional[float]) -> list[Config]:
    """The configurations of an earlier sweep (those below a speed-up, if given)."""
    with open(path) as f:
        rows = json.load(f)["results"]
    names = [f.name for f in fields(Config)]
    return [Config(**{k: r[k] for k in names if k in r}) for r in rows
            if below is None or r.get("speedup", float("inf")) < below]


def steps(cfg: Config, backend: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """torch.nn's call and rnnfast's on the same weights and input."""
    torch.manual_seed(0)
    cell = cfg.family.endswith("Cell")
    kwargs = dict(cfg.options) if cell else dict(num_layers=cfg.layers, bidirectional=cfg.bidirectional,
                                                  batch_first=cfg.batch_first, **cfg.options)
    ref = getattr(nn, cfg.family)(cfg.I, cfg.H, **kwargs)
    fast = getattr(rnnfast, cfg.family)(cfg.I, cfg.H, backend=backend, **kwargs)
    fast.load_state_dict(ref.state_dict())
    dtype = torch.float32 if cfg.autocast else getattr(torch, cfg.dtype)
    ref, fast = ref.to(dtype), fast.to(dtype)
    x, call_plain, loss = (cell_call if cell else layer_call)(cfg, dtype)

    def call(module: nn.Module) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast):
            return call_plain(module)

    def make(module: nn.Module) -> Callable[[], Any]:
        if cfg.mode == "fwd":
            module.eval()

            def fwd() -> Any:
                with torch.no_grad():
                    return call(module)

            return fwd
        module.train()
        x.requires_grad_(cfg.input_grad)

        def fwdbwd() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            loss(call(module)).backward()

        return fwdbwd

    return make(ref), make(fast)


def layer_call(cfg: Config, dtype: torch.dtype) -> tuple[Tensor, Callable[[nn.Module], Any], Callable[[Any], Tensor]]:
    """A layer's input, its call (packed or padded, states given or not) and the loss training sums."""
    x = torch.randn((cfg.B, cfg.T, cfg.I) if cfg.batch_first else (cfg.T, cfg.B, cfg.I), dtype=dtype)
    lengths = torch.randint(1, cfg.T + 1, (cfg.B,))
    lengths[0] = cfg.T
    hx = None
    if cfg.states:
        rows = (cfg.layers * (2 if cfg.bidirectional else 1), cfg.B)
        h = torch.randn(*rows, cfg.options.get("proj_size", cfg.H), dtype=dtype)
        hx = (h, torch.randn(*rows, cfg.H, dtype=dtype)) if cfg.family == "LSTM" else h

    def call(module: nn.Module) -> Any:
        if cfg.packed:
            return module(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=cfg.batch_first,
                                                            enforce_sorted=False), hx)
        return module(x, hx)

    def loss(result: Any) -> Tensor:
        out = result[0]
        return (out.data if cfg.packed else out).sum()

    return x, call, loss


def cell_call(cfg: Config, dtype: torch.dtype) -> tuple[Tensor, Callable[[nn.Module], Any], Callable[[Any], Tensor]]:
    """A cell's inputs, its call (T steps in a Python loop, the state carried) and the loss training
    sums (every step's output)."""
    lstm = cfg.family == "LSTMCell"
    x = torch.randn(cfg.T, cfg.B, cfg.I, dtype=dtype)
    hx = None
    if cfg.states:
        state = lambda: torch.randn(cfg.B, cfg.H, dtype=dtype)  # noqa: E731
        hx = (state(), state()) if lstm else state()

    def call(cell: nn.Module) -> list[Tensor]:
        state, outs = hx, []
        for t in range(cfg.T):
            state = cell(x[t], state)
            outs.append(state[0] if lstm else state)
        return outs

    return x, call, lambda outs: torch.stack(outs).sum()


def measure(cfg: Config, backend: str, rounds: int, min_seconds: float) -> dict:
    """torch.nn's median ms and rnnfast's speed-up over it (p20/p50/p80 of the per-round ratios)."""
    torch_step, fast_step = steps(cfg, backend)
    for step in (torch_step, fast_step, torch_step, fast_step):  # warm-up: weight caches, allocator
        step()
    calls = max(1, round(min_seconds / max(time_batch(torch_step, 1, "cpu"), 1e-6)))
    base, fast = [], []
    for _ in range(rounds):
        base.append(time_batch(torch_step, calls, "cpu"))
        fast.append(time_batch(fast_step, calls, "cpu"))
    return {"torch_ms": sorted(base)[len(base) // 2] * 1e3, **paired_speedup(base, fast)}


PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16 (modules, inputs and states cast)",
              "float16": "float16 (modules, inputs and states cast)", "float64": "float64 (modules, inputs and states cast)",
              "autocast": "bfloat16 by autocast (float32 modules under torch.autocast)"}


def what(args: argparse.Namespace) -> str:
    """Where the configurations came from, for the report."""
    if args.rerun:
        return f"the configurations of {args.rerun}" + (f" below {args.below:g}x" if args.below is not None else "")
    return f"seed {args.seed}, {args.count} draws (cost cap {args.max_cost:g} multiply-adds)"


def markdown(env: dict, backend: str, args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [f"# rnnfast bench.sweep: {env['device_name']} (cpu)", "",
             f"{env['date']}, commit {env['git_commit']}, {env['threads']} threads ({env['cpu_count']} CPUs), "
             f"torch {env['torch']}, backend `{backend}`, {PRECISIONS[args.precision]}; {what(args)}, "
             f"{args.rounds} rounds of "
             f"{args.min_seconds:g} s batches. "
             f"Host allocator: {env['allocator']}.", "",
             "Speed-up: the median over rounds of torch.nn's time / rnnfast's in the same round (>1 faster); "
             "p20-p80 beside it. Slowest first.", "",
             "| config | torch.nn ms | speed-up | p20-p80 |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("speedup", float("inf"))):
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | |")
        else:
            lines.append(f"| {r['label']} | {r['torch_ms']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['speedup_p20']:.2f}-{r['speedup_p80']:.2f} |")
    done = [r for r in rows if "speedup" in r]
    below = sum(r["speedup"] < 1.0 for r in done)
    lines += ["", f"{len(done)} configurations timed, {below} below 1.0x."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=60, help="configurations drawn (those over --max-cost are redrawn)")
    p.add_argument("--modes", nargs="*", choices=("fwd", "fwdbwd"), default=["fwd", "fwdbwd"])
    p.add_argument("--backend", default="cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="float32",
                   help="of the drawn configurations (a rerun keeps each one's)")
    p.add_argument("--max-cost", type=float, default=3e10, help="multiply-adds per call at most")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.03, help="length of one timed batch of calls")
    p.add_argument("--out", default=os.path.join("runs", "bench"), help="output folder (runs/bench)")
    p.add_argument("--rerun", help="an earlier sweep's JSON: time its configurations (not new draws)")
    p.add_argument("--below", type=float, help="with --rerun: only those whose speed-up was below this")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
    env = report.environment("cpu", args.threads, "sweep")
    env["allocator"] = keep_freed_memory()
    if args.rerun:
        configs = rerun(args.rerun, args.below)
        if configs:  # the report names the precision the configurations ran in
            args.precision = configs[0].precision
    else:
        configs = drawn(args.seed, args.count, args.modes, args.max_cost, args.precision)
    os.makedirs(args.out, exist_ok=True)
    stem = report.results_stem(args.out, env, "sweep")
    rows: list[dict] = []
    for i, cfg in enumerate(configs):
        try:
            row = {"label": cfg.label, **asdict(cfg), **measure(cfg, args.backend, args.rounds, args.min_seconds)}
            print(f"[{i + 1}/{len(configs)}] {row['speedup']:5.2f}x  {row['torch_ms']:9.3f} ms  {cfg.label}",
                  flush=True)
        except Exception as err:  # noqa: BLE001 - a configuration that fails is reported, the sweep goes on
            row = {"label": cfg.label, **asdict(cfg), "error": f"{type(err).__name__}: {err}"[:300]}
            print(f"[{i + 1}/{len(configs)}] error {row['error']}  {cfg.label}", flush=True)
        rows.append(row)
        with open(stem + ".json", "w") as f:  # after every configuration: a stopped run keeps what it measured
            json.dump({"schema": "rnnfast-sweep/1", "environment": env, "args": vars(args), "results": rows}, f,
                      indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(env, args.backend, args, rows))
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
