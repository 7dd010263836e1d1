"""ETTh1 forecasting with rnnfast recurrent layers, at the standard long-horizon protocol.

Protocol (Informer/Autoformer/DLinear/PatchTST/SegRNN): train rows 0..8640,
validation 8640-L..11520, test 11520-L..14400 for lookback L; z-score with
training statistics; stride-1 windows; MSE/MAE on the normalised test set.

    python examples/forecast.py --task multivariate --mode direct --horizon 96
    python examples/forecast.py --task univariate --mode encoder-decoder --model gru-encdec --horizon 96
    python examples/forecast.py --all            # the whole table, merged into --out/metrics.json
    python examples/forecast.py --all --smoke    # tiny epochs, seconds
    python examples/forecast.py --all --out examples/results/forecast   # refresh the committed table

Outputs go to ``runs/forecast/`` unless ``--out`` says otherwise; smoke runs
are kept apart from full ones and never write into ``examples/results/``.

Models: ``segrnn`` (SegRNN-style channel-independent GRU over 48-step
segments with parallel multi-step decoding), ``gru-direct``, ``gru-seq2value``
(next-step model: the next value, and rolled out autoregressively), ``gru-encdec`` (decoder trained
with scheduled teacher forcing), and the baselines ``last-value`` and ``linear``
(least-squares linear map over the lookback). Every recurrent core is an
rnnfast layer or cell.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import rnnfast
from rnnfast.backend import RNNSpec, resolve

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "ETTh1.csv"
DEFAULT_OUT = Path("runs/forecast")
COMMITTED = ROOT / "examples" / "results"
HORIZONS = (96, 192, 336, 720)
TRAIN_END, VAL_END, TEST_END = 12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24
MODELS = {  # model -> mode
    "segrnn": "direct",
    "gru-direct": "direct",
    "gru-seq2value": "seq2value",
    "gru-encdec": "encoder-decoder",
    "linear": "direct",
    "last-value": "direct",
}
# Published multivariate ETTh1 test MSE at L=96 (SegRNN; others at H=96 only).
PUBLISHED = {96: 0.368, 192: 0.408, 336: 0.444, 720: 0.446}
PUBLISHED_OTHERS_96 = "iTransformer 0.386, DLinear 0.386, PatchTST 0.414"


# ---------------------------------------------------------------- data


def load_etth1(path: Path = DATA, task: str = "multivariate") -> np.ndarray:
    """The raw ETTh1 values ``(rows, channels)``: all seven columns, or OT only."""
    header = path.read_text().splitlines()[0].split(",")
    raw = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(1, len(header)), dtype=np.float64)
    return raw if task == "multivariate" else raw[:, [header.index("OT") - 1]]


def split_bounds(lookback: int) -> dict[str, tuple[int, int]]:
    """Row ranges ``[start, end)`` of the train, val and test segments for lookback ``lookback``."""
    return {
        "train": (0, TRAIN_END),
        "val": (TRAIN_END - lookback, VAL_END),
        "test": (VAL_END - lookback, TEST_END),
    }


@dataclass
class Splits:
    """Normalised train/val/test segments and the training statistics used."""

    train: Tensor
    val: Tensor
    test: Tensor
    mean: np.ndarray
    std: np.ndarray


def make_splits(raw: np.ndarray, lookback: int) -> Splits:
    """Cut the standard segments and z-score them with statistics of the training rows only."""
    train_rows = raw[:TRAIN_END]
    mean, std = train_rows.mean(0), train_rows.std(0)
    parts = {k: torch.tensor((raw[a:b] - mean) / std, dtype=torch.float32) for k, (a, b) in split_bounds(lookback).items()}
    return Splits(parts["train"], parts["val"], parts["test"], mean, std)


def n_windows(segment: Tensor, lookback: int, horizon: int) -> int:
    """Number of stride-1 (lookback, horizon) windows in a segment."""
    return segment.size(0) - lookback - horizon + 1


def windows(segment: Tensor, starts: Tensor, lookback: int, horizon: int) -> tuple[Tensor, Tensor]:
    """Inputs ``(B, L, C)`` and targets ``(B, H, C)`` of the windows starting at ``starts``."""
    idx = starts.unsqueeze(1) + torch.arange(lookback + horizon).unsqueeze(0)
    w = segment[idx]
    return w[:, :lookback], w[:, lookback:]


# ---------------------------------------------------------------- models


class LastValue(nn.Module):
    """Repeat the last observed value over the horizon."""

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.horizon = horizon

    def forward(self, x: Tensor) -> Tensor:
        return x[:, -1:].expand(-1, self.horizon, -1)


class LinearForecaster(nn.Module):
    """One linear map over the lookback shared by channels, on last-value-subtracted input."""

    def __init__(self, lookback: int, horizon: int) -> None:
        super().__init__()
        self.proj = nn.Linear(lookback, horizon)

    def forward(self, x: Tensor) -> Tensor:
        last = x[:, -1:]
        return self.proj((x - last).transpose(1, 2)).transpose(1, 2) + last

    @torch.no_grad()
    def fit(self, segment: Tensor, ridge: float = 1e-3) -> None:
        """Least-squares fit on every training window (all channels pooled)."""
        L, H = self.proj.in_features, self.proj.out_features
        x, y = windows(segment, torch.arange(n_windows(segment, L, H)), L, H)
        last = x[:, -1:]
        X = (x - last).transpose(1, 2).reshape(-1, L).double()
        Y = (y - last).transpose(1, 2).reshape(-1, H).double()
        X1 = torch.cat([X, torch.ones(X.size(0), 1, dtype=X.dtype)], 1)
        A = X1.T @ X1 + ridge * X1.size(0) * torch.eye(L + 1, dtype=X.dtype)
        W = torch.linalg.solve(A, X1.T @ Y)
        self.proj.weight.copy_(W[:L].T.float())
        self.proj.bias.copy_(W[L].float())


class SegRNN(nn.Module):
    """SegRNN-style forecaster: channel-independent GRU over segments, parallel multi-step decoding.

    Each channel's lookback (minus its last value) is cut into segments of
    ``seg`` steps, embedded and encoded by one rnnfast GRU; the final state is
    then run one step from a (position, channel) embedding per output segment,
    all segments in parallel, and each output state is projected to ``seg`` values.
    """

    def __init__(self, lookback: int, horizon: int, channels: int, hidden: int = 512, seg: int = 48,
                 dropout: float = 0.5, backend: str = "auto") -> None:
        super().__init__()
        if lookback % seg or horizon % seg:
            raise ValueError(f"lookback {lookback} and horizon {horizon} must be multiples of seg {seg}")
        self.seg, self.n_out, self.channels = seg, horizon // seg, channels
        self.embed = nn.Sequential(nn.Linear(seg, hidden), nn.ReLU())
        self.rnn = rnnfast.GRU(hidden, hidden, batch_first=True, backend=backend)
        self.pos = nn.Parameter(torch.randn(self.n_out, hidden // 2))
        self.chan = nn.Parameter(torch.randn(channels, hidden - hidden // 2))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, seg))

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        last = x[:, -1:]
        z = (x - last).transpose(1, 2).reshape(B * C, L // self.seg, self.seg)
        _, h = self.rnn(self.embed(z))  # (1, B*C, hidden)
        M = self.n_out
        emb = torch.cat([self.pos.unsqueeze(0).expand(C, -1, -1), self.chan.unsqueeze(1).expand(-1, M, -1)], -1)
        emb = emb.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * C * M, 1, -1)
        _, hy = self.rnn(emb, h.repeat_interleave(M, dim=1))
        y = self.head(hy[0]).reshape(B, C, M * self.seg).transpose(1, 2)
        return y + last


class GRUDirect(nn.Module):
    """GRU over the lookback (all channels as input), last state mapped to the whole horizon."""

    def __init__(self, horizon: int, channels: int, hidden: int = 256, backend: str = "auto") -> None:
        super().__init__()
        self.horizon, self.channels = horizon, channels
        self.rnn = rnnfast.GRU(channels, hidden, batch_first=True, backend=backend)
        self.head = nn.Linear(hidden, horizon * channels)

    def forward(self, x: Tensor) -> Tensor:
        last = x[:, -1:]
        _, h = self.rnn(x - last)
        return self.head(h[0]).view(-1, self.horizon, self.channels) + last


class GRUSeq2Value(nn.Module):
    """Next-step GRU: trained to predict every next value of the sequence, rolled out for the horizon.

    It predicts the change from the current value, so training on every
    position is causal; forecasting feeds each prediction back, step by step,
    through the same rnnfast GRU with its carried state.
    """

    def __init__(self, horizon: int, channels: int, hidden: int = 256, backend: str = "auto") -> None:
        super().__init__()
        self.horizon = horizon
        self.rnn = rnnfast.GRU(channels, hidden, batch_first=True, backend=backend)
        self.head = nn.Linear(hidden, channels)

    def training_loss(self, x: Tensor, y: Tensor, loss_fn: Callable, progress: float) -> Tensor:
        seq = torch.cat([x, y[:, :1]], 1)
        out, _ = self.rnn(seq[:, :-1])
        return loss_fn(seq[:, :-1] + self.head(out), seq[:, 1:])

    def next_value(self, x: Tensor) -> Tensor:
        """The one-step forecast ``(B, 1, C)``: the seq2value model's own task."""
        out, _ = self.rnn(x)
        return x[:, -1:] + self.head(out[:, -1:])

    def forward(self, x: Tensor) -> Tensor:
        out, h = self.rnn(x)
        value = x[:, -1:] + self.head(out[:, -1:])
        preds = [value]
        for _ in range(self.horizon - 1):
            out, h = self.rnn(value, h)
            value = value + self.head(out)
            preds.append(value)
        return torch.cat(preds, 1)


class GRUEncoderDecoder(nn.Module):
    """GRU encoder and GRUCell decoder run autoregressively; teacher forcing is scheduled off in training."""

    def __init__(self, horizon: int, channels: int, hidden: int = 256, backend: str = "auto") -> None:
        super().__init__()
        self.horizon = horizon
        self.encoder = rnnfast.GRU(channels, hidden, batch_first=True, backend=backend)
        self.decoder = rnnfast.GRUCell(channels, hidden, backend=backend)
        self.head = nn.Linear(hidden, channels)

    def decode(self, x: Tensor, target: Optional[Tensor] = None, teacher_p: float = 0.0) -> Tensor:
        """Forecast ``(B, H, C)``; with ``target``, each step's input is the truth with probability ``teacher_p``."""
        last = x[:, -1:]
        _, h = self.encoder(x - last)
        h, value, preds = h[0], torch.zeros_like(last[:, 0]), []
        for t in range(self.horizon):
            h = self.decoder(value, h)
            value = self.head(h)
            preds.append(value)
            if target is not None and torch.rand(()) < teacher_p:
                value = target[:, t] - last[:, 0]
        return torch.stack(preds, 1) + last

    def training_loss(self, x: Tensor, y: Tensor, loss_fn: Callable, progress: float) -> Tensor:
        teacher_p = max(0.0, 1.0 - 2.0 * progress)  # 1 -> 0 over the first half of the epochs or time budget
        return loss_fn(self.decode(x, y, teacher_p), y)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(x)


def default_clip(name: str) -> Optional[float]:
    """Gradient-norm clip of a model: 1.0 for the GRUs run over time steps, none for SegRNN.

    SegRNN's recurrence is two segment steps long (and its published recipe does
    not clip); the other GRUs backpropagate through 96 steps and more.
    """
    return None if name == "segrnn" else 1.0


def build_model(name: str, lookback: int, horizon: int, channels: int, hidden: Optional[int], backend: str) -> nn.Module:
    """The named model (``hidden=None``: its default width)."""
    kw = {} if hidden is None else {"hidden": hidden}
    if name == "segrnn":
        return SegRNN(lookback, horizon, channels, backend=backend, **kw)
    if name == "gru-direct":
        return GRUDirect(horizon, channels, backend=backend, **kw)
    if name == "gru-seq2value":
        return GRUSeq2Value(horizon, channels, backend=backend, **kw)
    if name == "gru-encdec":
        return GRUEncoderDecoder(horizon, channels, backend=backend, **kw)
    if name == "linear":
        return LinearForecaster(lookback, horizon)
    if name == "last-value":
        return LastValue(horizon)
    raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")


def recurrent_layers(model: nn.Module) -> list[str]:
    """Class paths of the recurrent layers and cells in ``model``, e.g. ``rnnfast.modules.GRU``."""
    kinds = (nn.RNNBase, nn.RNNCellBase)
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules() if isinstance(m, kinds)})


def backend_name(requested: str) -> str:
    """The backend rnnfast actually runs a float32 CPU GRU call on for ``requested``."""
    spec = RNNSpec(mode="GRU", input_size=8, hidden_size=8)
    return resolve(requested, spec, torch.zeros(1, 1, 8), False).name


# ---------------------------------------------------------------- training and evaluation


@torch.no_grad()
def evaluate(model: Callable[[Tensor], Tensor], segment: Tensor, lookback: int, horizon: int, batch: int = 1024,
             limit: Optional[int] = None) -> tuple[float, float]:
    """MSE and MAE over every stride-1 window of ``segment`` (the first ``limit`` only, in smoke runs).

    ``model`` maps inputs ``(B, lookback, C)`` to forecasts ``(B, horizon, C)``: a module (put in eval
    mode here) or a method of one already in eval mode.
    """
    if isinstance(model, nn.Module):
        model.eval()
    n = min(n_windows(segment, lookback, horizon), limit or math.inf)
    se = ae = 0.0
    for s in range(0, n, batch):
        x, y = windows(segment, torch.arange(s, min(s + batch, n)), lookback, horizon)
        err = model(x) - y
        se += err.pow(2).sum().item()
        ae += err.abs().sum().item()
    count = n * horizon * segment.size(1)
    return se / count, ae / count


@dataclass
class TrainConfig:
    """Optimisation settings of one run."""

    epochs: int = 30
    batch: int = 128
    lr: float = 1e-3
    patience: int = 5
    minutes: float = 9.0
    max_batches: Optional[int] = 20  # per epoch: validate every this many batches (None: whole passes)
    clip: Optional[float] = None  # gradient-norm clip (None: no clipping)
    eval_limit: Optional[int] = None  # validation windows (smoke runs)
    checkpoint: Optional[Path] = None


def train(model: nn.Module, splits: Splits, lookback: int, horizon: int, cfg: TrainConfig) -> dict:
    """Adam on L1 loss with early stopping on validation MSE; restores (and checkpoints) the best model."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e < 3 else 0.9 ** (e - 2))
    n = n_windows(splits.train, lookback, horizon)
    steps = min(cfg.max_batches or math.inf, math.ceil(n / cfg.batch))
    total, done = cfg.epochs * steps, 0
    t0, bad, epoch = time.perf_counter(), 0, 0
    best, _ = evaluate(model, splits.val, lookback, horizon, limit=cfg.eval_limit)  # the starting point counts
    best_epoch, best_state = 0, {k: v.detach().clone() for k, v in model.state_dict().items()}
    tqdm.write(f"  epoch 0: val mse {best:.4f}")
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        out_of_time = False
        for b in bar:
            x, y = windows(splits.train, perm[b * cfg.batch:(b + 1) * cfg.batch], lookback, horizon)
            if hasattr(model, "training_loss"):
                progress = max(done / total, (time.perf_counter() - t0) / (cfg.minutes * 60))
                loss = model.training_loss(x, y, F.l1_loss, progress)
            else:
                loss = F.l1_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if cfg.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            done += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if time.perf_counter() - t0 > cfg.minutes * 60:
                out_of_time = True
                break
        bar.close()
        sched.step()
        val_mse, _ = evaluate(model, splits.val, lookback, horizon, limit=cfg.eval_limit)
        improved = val_mse < best
        if improved:
            best, best_epoch, bad = val_mse, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if cfg.checkpoint is not None:
                cfg.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save(best_state, cfg.checkpoint)
        else:
            bad += 1
        elapsed = (time.perf_counter() - t0) / 60
        tqdm.write(f"  epoch {epoch + 1}: val mse {val_mse:.4f}{' *' if improved else ''} ({elapsed:.1f} min)")
        if bad >= cfg.patience or out_of_time:
            break
    model.load_state_dict(best_state)
    return {"epochs": epoch + 1, "best_epoch": best_epoch, "val_mse": best, "train_minutes": (time.perf_counter() - t0) / 60}


# ---------------------------------------------------------------- runs and reports


def run_key(r: dict) -> tuple:
    """The identity of a run in metrics.json: task, mode, model, lookback, horizon, and whether a smoke run."""
    return (r["task"], r["mode"], r["model"], r["lookback"], r["horizon"], bool(r.get("smoke")))


def is_committed(path: Path) -> bool:
    """Whether ``path`` lies inside the committed ``examples/results/`` (no checkpoints or smoke runs there)."""
    path = path.resolve()
    return path == COMMITTED or COMMITTED in path.parents


def run_one(task: str, model_name: str, horizon: int, args: argparse.Namespace, out: Path) -> dict:
    """Train and test one model at one horizon; returns its metrics record (and saves plot samples)."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    L = args.lookback
    splits = make_splits(load_etth1(DATA, task), L)
    model = build_model(model_name, L, horizon, splits.train.size(1), args.hidden, args.backend)
    mode = MODELS[model_name]
    tag = f"{task}_{mode}_{model_name}_L{L}_H{horizon}"
    print(f"== {tag}")
    info: dict = {"train_minutes": 0.0}
    t0 = time.perf_counter()
    if isinstance(model, LinearForecaster):
        model.fit(splits.train)
        info["train_minutes"] = (time.perf_counter() - t0) / 60
    elif not isinstance(model, LastValue):
        minutes = args.minutes if args.minutes is not None else (9.0 if model_name == "segrnn" else 3.0)
        clip = default_clip(model_name) if args.clip is None else (args.clip or None)
        cfg = TrainConfig(epochs=2 if args.smoke else args.epochs, batch=args.batch, patience=args.patience,
                          minutes=minutes, lr=args.lr, max_batches=3 if args.smoke else args.epoch_batches,
                          clip=clip,
                          eval_limit=SMOKE_WINDOWS if args.smoke else None,
                          checkpoint=(DEFAULT_OUT if is_committed(out) else out) / "checkpoints" / f"{tag}.pt")
        info = {**train(model, splits, L, horizon, cfg), "clip": cfg.clip}
        info["train_minutes"] = (time.perf_counter() - t0) / 60
    limit = SMOKE_WINDOWS if args.smoke else None
    mse, mae = evaluate(model, splits.test, L, horizon, limit=limit)
    save_samples(model, splits.test, L, horizon, out / "samples" / f"{tag}.npz")
    rec = {
        "task": task, "mode": mode, "model": model_name, "lookback": L, "horizon": horizon,
        "mse": round(mse, 5), "mae": round(mae, 5), "train_minutes": round(info["train_minutes"], 3),
        "layers": recurrent_layers(model), "backend": backend_name(args.backend),
        "test_windows": n_windows(splits.test, L, horizon), "seed": args.seed, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()), "batch": args.batch,
        "epoch_batches": args.epoch_batches, "patience": args.patience, "smoke": bool(args.smoke),
    }
    rec.update({k: info[k] for k in ("epochs", "best_epoch", "val_mse", "clip") if k in info})
    print(f"   test mse {mse:.4f} mae {mae:.4f} ({rec['train_minutes']:.2f} min)")
    if isinstance(model, GRUSeq2Value):  # what it was trained for: the next value, beside the 96-step rollout
        rec["next_value_mse"], rec["next_value_mae"] = (round(v, 5) for v in evaluate(model.next_value, splits.test, L, 1, limit=limit))
        rec["next_value_last_value_mse"] = round(evaluate(LastValue(1), splits.test, L, 1, limit=limit)[0], 5)
        print(f"   next value: test mse {rec['next_value_mse']:.4f} (last value {rec['next_value_last_value_mse']:.4f})")
    return rec


SAMPLE_WINDOWS = (0, 1200, 2400)
SMOKE_WINDOWS = 256  # windows evaluated in smoke runs


@torch.no_grad()
def save_samples(model: nn.Module, segment: Tensor, lookback: int, horizon: int, path: Path) -> None:
    """Save the last channel (OT) of a few fixed test windows: history, truth and forecast."""
    model.eval()
    starts = torch.tensor([s for s in SAMPLE_WINDOWS if s < n_windows(segment, lookback, horizon)])
    x, y = windows(segment, starts, lookback, horizon)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, starts=starts.numpy(), history=x[..., -1].numpy(), truth=y[..., -1].numpy(),
             forecast=model(x)[..., -1].numpy())


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Merge ``new`` into the records in ``path`` (same task/mode/model/lookback/horizon: replaced)."""
    old = json.loads(path.read_text()) if path.exists() else []
    merged = {run_key(r): r for r in old}
    merged.update({run_key(r): r for r in new})
    records = sorted(merged.values(), key=lambda r: (r["task"] != "multivariate", r["horizon"], r["model"]))
    path.write_text(json.dumps(records, indent=1) + "\n")
    return records


def write_table(records: list[dict], path: Path) -> None:
    """Markdown table of test MSE/MAE per task, horizon and model, with the published numbers beside."""
    lines = [
        "# ETTh1 test results (normalised MSE / MAE, standard split, stride-1 windows)",
        "",
        "| task | H | model | mode | L | MSE | MAE | train min | epochs (best) | clip | published MSE (SegRNN) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        pub = PUBLISHED.get(r["horizon"]) if r["task"] == "multivariate" and r["lookback"] == 96 else None
        ep = f"{r['epochs']} ({r['best_epoch']})" if "epochs" in r else "-"
        lines.append(
            f"| {r['task']} | {r['horizon']} | {r['model']}{' (smoke)' if r.get('smoke') else ''} | {r['mode']} "
            f"| {r['lookback']} | {r['mse']:.4f} | {r['mae']:.4f} | {r['train_minutes']:.2f} | {ep} "
            f"| {r.get('clip') or '-'} | {'-' if pub is None else f'{pub:.3f}'} |"
        )
    lines.append("")
    for r in records:
        if "next_value_mse" in r:
            lines.append(f"{r['task']} {r['model']}{' (smoke)' if r.get('smoke') else ''}, L={r['lookback']}: "
                         f"the next value (one step) has test MSE {r['next_value_mse']:.4f} / MAE "
                         f"{r['next_value_mae']:.4f} (last value: MSE {r['next_value_last_value_mse']:.4f}); "
                         f"the table's row is its {r['horizon']}-step rollout.")
    lines += [
        "",
        f"Published multivariate ETTh1 at L=96, H=96: SegRNN 0.368, {PUBLISHED_OTHERS_96} (MSE).",
        "Train minutes: wall-clock on the machine that ran them (a shared 2-core CPU here); rnnfast backend(s): "
        + ", ".join(f"`{b}`" for b in sorted({r["backend"] for r in records})) + ".",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(sample_dir: Path, path: Path) -> None:
    """Forecast vs truth (OT channel) on a few test windows: H=96 for every model, SegRNN at longer horizons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = sorted(sample_dir.glob("multivariate_*_L*_H96.npz"))
    long = [p for h in HORIZONS[1:] for p in sample_dir.glob(f"multivariate_direct_segrnn_L*_H{h}.npz")]
    if not short:
        return
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    for col in range(3):
        ax = axes[0, col]
        for k, p in enumerate(short):
            d = np.load(p)
            if col >= len(d["starts"]):
                continue
            L, H = d["history"].shape[1], d["truth"].shape[1]
            if k == 0:
                ax.plot(range(L), d["history"][col], color="0.5", lw=1, label="history")
                ax.plot(range(L, L + H), d["truth"][col], color="k", lw=1.5, label="truth")
            ax.plot(range(L, L + H), d["forecast"][col], lw=1, label=p.stem.split("_")[2])
        ax.set_title(f"multivariate, OT, H=96, test window {SAMPLE_WINDOWS[col]}")
        ax.legend(fontsize=7)
    for col, p in enumerate(long[:3]):
        ax, d = axes[1, col], np.load(p)
        L, H = d["history"].shape[1], d["truth"].shape[1]
        ax.plot(range(L), d["history"][0], color="0.5", lw=1, label="history")
        ax.plot(range(L, L + H), d["truth"][0], color="k", lw=1.5, label="truth")
        ax.plot(range(L, L + H), d["forecast"][0], color="C3", lw=1, label="segrnn")
        ax.set_title(f"multivariate, OT, SegRNN H={H}, test window {SAMPLE_WINDOWS[0]}")
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("hour")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_runs(smoke: bool) -> list[tuple[str, str, int]]:
    """(task, model, horizon) of every run in the results table."""
    runs = [(t, m, h) for t in ("multivariate", "univariate") for m in ("last-value", "linear") for h in HORIZONS]
    runs += [("multivariate", "segrnn", h) for h in HORIZONS]
    runs += [(t, m, 96) for t in ("univariate", "multivariate") for m in ("segrnn", "gru-direct", "gru-seq2value", "gru-encdec")]
    if smoke:  # every model once, at H=96
        runs = [r for r in runs if r[2] == 96]
    return list(dict.fromkeys(runs))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--model`` defaults to the model of ``--mode``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("univariate", "multivariate"), default="multivariate")
    p.add_argument("--mode", choices=("seq2value", "direct", "encoder-decoder"), help="default: direct")
    p.add_argument("--model", choices=list(MODELS), help="default: segrnn for direct, else the GRU model of the mode")
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--lookback", type=int, default=96)
    p.add_argument("--all", action="store_true", help="run the whole table, merging into metrics.json")
    p.add_argument("--smoke", action="store_true", help="tiny epochs and models (seconds)")
    p.add_argument("--minutes", type=float, help="training time cap per run (default 9 for segrnn, 3 otherwise)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, help="gradient-norm clip, 0: none (default: 1.0, none for segrnn)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epoch-batches", type=int, default=20, help="batches per epoch (validation and early stopping); 0: whole passes")
    p.add_argument("--hidden", type=int, help="recurrent width (default: 512 segrnn, 256 gru models; 16 in smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared CPU)")
    p.add_argument("--backend", default="auto", help="rnnfast backend: auto, reference, cpu, ...")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.model is None:
        args.model = {"direct": "segrnn", "seq2value": "gru-seq2value", "encoder-decoder": "gru-encdec"}[args.mode or "direct"]
    elif args.mode is not None and MODELS[args.model] != args.mode:
        p.error(f"model {args.model} runs in mode {MODELS[args.model]!r}, not {args.mode!r}")
    if args.smoke and args.hidden is None:
        args.hidden = 16
    if args.smoke and is_committed(args.out):
        p.error(f"--smoke results are not written into the committed {COMMITTED.relative_to(ROOT)}/; pick another --out")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    """Run one horizon or the whole table; merge records into ``--out``/metrics.json and redraw the reports."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = table_runs(args.smoke) if args.all else [(args.task, args.model, args.horizon)]
    records = []
    for task, model_name, horizon in runs:
        records = merge_records(args.out / "metrics.json", [run_one(task, model_name, horizon, args, args.out)])
        write_table(records, args.out / "table.md")
    write_plot(args.out / "samples", args.out / "forecast.png")
    return records


if __name__ == "__main__":
    main()
