"""Character-level language model on Tiny Shakespeare with rnnfast layers.

Embedding -> rnnfast.LSTM (or rnnfast.GRU, or the Elman rnnfast.RNN) -> linear over the characters,
trained with truncated BPTT on a time budget, then sampled one character at a
time through the layer (T=1, B=1 calls: the decode path).

    python examples/charlm.py train --minutes 5 --out runs/charlm
    python examples/charlm.py train --minutes 10 --out runs/charlm --resume   # continue to 10 min
    python examples/charlm.py train --minutes 5 --torch-layers --out runs/charlm-torch
    python examples/charlm.py sample --out runs/charlm --prompt "ROMEO:" --top-k 10
    python examples/charlm.py sample --out runs/charlm --beam 5

``train`` writes to ``--out``: ``ckpt.pt`` (model, optimizer, config, step,
carried state), ``metrics.json``, ``loss.png`` and ``samples.txt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import rnnfast

DATA = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
TEMPERATURES = (0.5, 1.0, 1.5)
# Settings a resumed run takes from its checkpoint: they fix the model, the data and the schedule.
RESUME_KEYS = ("cell", "embed", "hidden", "layers", "dropout", "seq_len", "batch", "lr", "warmup",
               "weight_decay", "clip", "seed", "data", "data_chars")
# --smoke: a model and a run small enough for a test (seconds on a CPU).
SMOKE = dict(embed=16, hidden=32, layers=2, seq_len=32, batch=8, data_chars=40_000, minutes=0.25,
             eval_every=2.0, eval_chars=2_000, sample_chars=40, warmup=5)

State = Union[Tensor, tuple[Tensor, Tensor]]


# ---------------------------------------------------------------- data

def load_corpus(path: str, max_chars: int = 0) -> str:
    """The text of ``path`` (its first ``max_chars`` characters when > 0)."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:max_chars] if max_chars > 0 else text


def encode(text: str, vocab: list[str]) -> Tensor:
    """Character ids (int64) of ``text``; every character must be in ``vocab``."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise ValueError(f"characters not in the model's vocabulary: {missing!r}")
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def split_corpus(cfg: argparse.Namespace, vocab: Optional[list[str]] = None) -> tuple[list[str], Tensor, Tensor]:
    """``(vocab, train, val)``: the corpus's first 90% for training, the rest for validation."""
    text = load_corpus(cfg.data, cfg.data_chars)
    vocab = vocab or sorted(set(text))
    data = encode(text, vocab)
    split = int(0.9 * len(data))
    return vocab, data[:split], data[split:]


def streams(data: Tensor, rows: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs and next-character targets as ``rows`` contiguous streams, ``(rows, n)`` each.

    Batch k is columns ``k*T:(k+1)*T``, so row r of batch k+1 continues row r
    of batch k and the recurrent state can be carried across batches.
    """
    n = (len(data) - 1 - offset) // rows
    x = data[offset:offset + rows * n].view(rows, n)
    y = data[offset + 1:offset + 1 + rows * n].view(rows, n)
    return x, y


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where epoch ``epoch`` starts its streams, so batch boundaries move between epochs."""
    return int(torch.randint(seq_len, (1,), generator=torch.Generator().manual_seed(seed * 1000 + epoch)))


# ---------------------------------------------------------------- model

class CharLM(nn.Module):
    """Embedding -> recurrent stack -> dropout -> linear over the vocabulary."""

    def __init__(self, vocab_size: int, cfg: argparse.Namespace, torch_layers: bool = False) -> None:
        super().__init__()
        lib = nn if torch_layers else rnnfast
        rnn_cls = {"lstm": lib.LSTM, "gru": lib.GRU, "rnn": lib.RNN}[cfg.cell]  # RNN: tanh
        extra = {} if torch_layers else {"backend": cfg.backend}
        self.embed = nn.Embedding(vocab_size, cfg.embed)
        self.rnn = rnn_cls(cfg.embed, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0, **extra)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, vocab_size)

    def forward(self, x: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
        """Logits ``(B, T, V)`` for ids ``(B, T)``, and the state after the last step."""
        out, state = self.rnn(self.embed(x), state)
        return self.head(self.drop(out)), state


def layer_class(model: CharLM) -> str:
    """Full name of the recurrent layer's class, e.g. ``rnnfast.modules.LSTM``."""
    cls = type(model.rnn)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolved_backend(model: CharLM, steps: int, batch: int) -> str:
    """The backend the recurrent layer runs a ``(batch, steps)`` call on, in its current mode."""
    if not isinstance(model.rnn, (rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN)):
        return "torch.nn"
    p = next(model.parameters())
    return model.rnn.resolved_backend(torch.zeros(batch, steps, model.rnn.input_size, dtype=p.dtype, device=p.device))


def map_state(fn: Callable[[Tensor], Tensor], state: State) -> State:
    """Apply ``fn`` to the state tensor(s): ``h`` for GRU and RNN, ``(h, c)`` for LSTM."""
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


# ---------------------------------------------------------------- evaluation and decoding

@torch.no_grad()
def evaluate(model: CharLM, x: Tensor, y: Tensor, seq_len: int) -> float:
    """Mean cross-entropy (nats/char) over streams ``x -> y``, state carried across chunks."""
    model.eval()
    state, total = None, 0.0
    for k in range(0, x.size(1), seq_len):
        logits, state = model(x[:, k:k + seq_len], state)
        total += F.cross_entropy(logits.flatten(0, 1), y[:, k:k + seq_len].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


def _prime(model: CharLM, vocab: list[str], prompt: str) -> tuple[Tensor, State]:
    """Run the prompt through the model: last log-probabilities ``(1, V)`` and the state."""
    if not prompt:
        raise ValueError("the prompt must have at least one character")
    ids = encode(prompt, vocab).to(next(model.parameters()).device)
    logits, state = model(ids.unsqueeze(0))
    return F.log_softmax(logits[:, -1].float(), dim=-1), state


@torch.inference_mode()
def sample(model: CharLM, vocab: list[str], prompt: str, length: int, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0) -> str:
    """``length`` characters drawn after ``prompt``, one T=1, B=1 step at a time.

    ``temperature`` scales the logits; ``top_k > 0`` keeps only the k likeliest characters.
    """
    model.eval()
    logp, state = _prime(model, vocab, prompt)
    gen = torch.Generator(device=logp.device).manual_seed(seed)
    out: list[int] = []
    for step in range(length):
        logits = logp[0] / temperature
        if 0 < top_k < logits.numel():
            logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -math.inf)
        ch = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        out.append(int(ch))
        if step + 1 < length:
            logits, state = model(ch.view(1, 1), state)
            logp = F.log_softmax(logits[:, -1].float(), dim=-1)
    return "".join(vocab[i] for i in out)


@torch.inference_mode()
def beam_search(model: CharLM, vocab: list[str], prompt: str, length: int, width: int = 5) -> str:
    """The likeliest ``length``-character continuation of ``prompt`` found with ``width`` beams.

    The beams run as one batch (T=1, B=width steps); each step keeps the
    ``width`` best extensions and reorders the carried states to match.
    """
    model.eval()
    logp, state = _prime(model, vocab, prompt)
    V = logp.size(-1)
    seqs = torch.zeros(1, 0, dtype=torch.long, device=logp.device)
    scores = torch.zeros(1, device=logp.device)
    for step in range(length):
        best = (scores.unsqueeze(1) + logp).flatten().topk(min(width, scores.numel() * V))
        beam, ch = best.indices // V, best.indices % V
        seqs, scores = torch.cat([seqs[beam], ch.unsqueeze(1)], dim=1), best.values
        if step + 1 < length:
            logits, state = model(ch.unsqueeze(1), map_state(lambda s: s.index_select(1, beam), state))
            logp = F.log_softmax(logits[:, -1].float(), dim=-1)
    return "".join(vocab[i] for i in seqs[0].tolist())


def make_samples(model: CharLM, vocab: list[str], args: argparse.Namespace) -> tuple[list[str], float]:
    """The temperature sweep (with ``--top-k``) and a beam-search sample, each with a title line.

    Also returns the sampling speed in chars/s, measured over the sweep.
    """
    n, prompt = args.sample_chars, args.prompt
    sections, seconds = [], 0.0
    for temp in args.temperature:
        t0 = time.perf_counter()
        text = sample(model, vocab, prompt, n, temperature=temp, top_k=args.top_k, seed=args.seed)
        seconds += time.perf_counter() - t0
        sections.append((f"temperature {temp}" + (f", top-k {args.top_k}" if args.top_k else ""), text))
    if args.beam > 0:
        sections.append((f"beam search, width {args.beam}", beam_search(model, vocab, prompt, n, args.beam)))
    return [f"----- {title} -----\n{prompt}{text}\n" for title, text in sections], n * len(args.temperature) / seconds


# ---------------------------------------------------------------- training

def lr_factor(step: int, progress: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` as ``progress`` goes 0 -> 1."""
    cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return min(1.0, (step + 1) / warmup) * cosine


def plot_curve(curve: list[dict], path: Path) -> None:
    """Train and validation loss against training tokens and training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "tokens", "training tokens"), (axes[1], "minutes", "training minutes")):
        ax.plot([p[key] for p in curve], [p["train_loss"] for p in curve], label="train")
        ax.plot([p[key] for p in curve], [p["val_loss"] for p in curve], "o-", ms=3, label="validation")
        ax.axhline(1.60, color="gray", ls=":", lw=1, label="1.60 nats/char")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/char)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config(args: argparse.Namespace) -> dict:
    """The run's settings as plain values (for the checkpoint and metrics.json)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def train(args: argparse.Namespace) -> dict:
    """Train on a time budget, evaluate, sample, and write everything to ``args.out``."""
    wall0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if args.resume else None
    if ckpt is not None:
        for key in RESUME_KEYS:
            setattr(args, key, ckpt["config"][key])
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    vocab, train_data, val_data = split_corpus(args, ckpt["vocab"] if ckpt else None)
    val_x, val_y = (t.to(args.device) for t in streams(val_data, args.batch))
    eval_cols = max(1, min(val_x.size(1), args.eval_chars // args.batch))  # the curve's validation subset

    model = CharLM(len(vocab), args, args.torch_layers).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    prog = dict(step=0, tokens=0, train_s=0.0, epoch=0, batch=0, curve=[])
    state = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        prog = ckpt["progress"]
        state = None if ckpt["state"] is None else map_state(lambda s: s.to(args.device), ckpt["state"])
    resumed_from = prog["step"]
    backend_train = resolved_backend(model, args.seq_len, args.batch)
    print(f"charlm: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(vocab)}, "
          f"{len(train_data):,} train / {len(val_data):,} val chars, layer {layer_class(model)} "
          f"on backend {backend_train!r} (available: {rnnfast.available_backends()}), {args.threads} threads")

    def save() -> None:
        torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=config(args), vocab=vocab,
                        progress=prog, state=state), ckpt_path)

    budget_s = args.minutes * 60
    T, B = args.seq_len, args.batch
    x_all, y_all = streams(train_data, B, epoch_offset(args.seed, prog["epoch"], T))
    losses: list[float] = []
    next_eval = prog["train_s"] + args.eval_every
    bar = tqdm(total=round(budget_s), initial=min(round(prog["train_s"]), round(budget_s)), unit="s",
               desc="train", dynamic_ncols=True)
    model.train()
    while prog["train_s"] < budget_s and not (args.max_steps and prog["step"] >= args.max_steps):
        if (prog["batch"] + 1) * T > x_all.size(1):  # end of an epoch: new stream offsets, fresh state
            prog["epoch"], prog["batch"], state = prog["epoch"] + 1, 0, None
            x_all, y_all = streams(train_data, B, epoch_offset(args.seed, prog["epoch"], T))
        cols = slice(prog["batch"] * T, (prog["batch"] + 1) * T)
        x, y = x_all[:, cols].to(args.device), y_all[:, cols].to(args.device)

        t0 = time.perf_counter()
        progress = max(prog["train_s"] / budget_s, prog["step"] / args.max_steps if args.max_steps else 0.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(prog["step"], progress, args.warmup)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        state = map_state(Tensor.detach, state)  # truncated BPTT: carry the values, cut the graph
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        dt = time.perf_counter() - t0

        prog["step"] += 1
        prog["batch"] += 1
        prog["tokens"] += x.numel()
        prog["train_s"] += dt
        bar.update(min(round(prog["train_s"]), round(budget_s)) - bar.n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{x.numel() / dt:,.0f}",
                        lr=f"{opt.param_groups[0]['lr']:.1e}", refresh=False)
        done = prog["train_s"] >= budget_s or (args.max_steps and prog["step"] >= args.max_steps)
        if prog["train_s"] >= next_eval or done:
            val = evaluate(model, val_x[:, :eval_cols], val_y[:, :eval_cols], T)
            prog["curve"].append(dict(step=prog["step"], tokens=prog["tokens"], minutes=prog["train_s"] / 60,
                                      train_loss=sum(losses) / len(losses), val_loss=val))
            bar.write(f"step {prog['step']:5d}  {prog['tokens'] / 1e6:6.2f}M tokens  "
                      f"{prog['train_s'] / 60:5.2f} min  train {prog['curve'][-1]['train_loss']:.3f}  "
                      f"val {val:.3f} nats/char")
            losses.clear()
            next_eval = prog["train_s"] + args.eval_every
            save()
    bar.close()
    save()

    val = evaluate(model, val_x, val_y, T)
    backend_decode = resolved_backend(model.eval(), 1, 1)
    print(f"\nvalidation loss {val:.4f} nats/char = {val / math.log(2):.4f} bits/char "
          f"after {prog['tokens']:,} tokens, {prog['train_s'] / 60:.2f} training minutes\n")
    samples, chars_per_s = make_samples(model, vocab, args)
    (out / "samples.txt").write_text("\n".join(samples), encoding="utf-8")
    print(samples[0])
    plot_curve(prog["curve"], out / "loss.png")
    metrics = dict(
        val_loss=val,
        bits_per_char=val / math.log(2),
        train_tokens=prog["tokens"],
        steps=prog["step"],
        resumed_from_step=resumed_from if args.resume else None,
        tokens_per_s=prog["tokens"] / prog["train_s"],
        sample_chars_per_s=chars_per_s,
        train_minutes=prog["train_s"] / 60,
        wall_minutes=(time.perf_counter() - wall0) / 60,
        layer_class=layer_class(model),
        requested_backend=None if args.torch_layers else args.backend,
        resolved_backend=dict(train=backend_train, decode=backend_decode),
        available_backends=rnnfast.available_backends(),
        env_backend=os.environ.get(rnnfast.ENV_VAR),
        parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=len(vocab),
        torch=torch.__version__,
        config=config(args),
        val_chars=val_y.numel(),
        curve_val_chars=val_y[:, :eval_cols].numel(),  # the curve's val_loss is on this prefix of each stream
        curve=prog["curve"],
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"train {metrics['tokens_per_s']:,.0f} tokens/s, sampling {chars_per_s:,.0f} chars/s "
          f"({metrics['layer_class']}, backend {backend_train!r} / decode {backend_decode!r})")
    print(f"outputs in {out}/: metrics.json, loss.png, samples.txt (all samples), ckpt.pt")
    return metrics


def sample_cmd(args: argparse.Namespace) -> None:
    """Load ``--out``'s checkpoint and print samples (and their speed). With ``--quantize int8``
    also the float and int8 models side by side: validation loss and sampling speed, in
    ``OUT/int8.json``."""
    torch.set_num_threads(args.threads)
    ckpt = torch.load(Path(args.out) / "ckpt.pt", map_location="cpu", weights_only=True)
    cfg = argparse.Namespace(**{**ckpt["config"], "backend": args.backend})
    model = CharLM(len(ckpt["vocab"]), cfg, args.torch_layers).to(args.device)
    model.load_state_dict(ckpt["model"])
    if args.quantize != "int8":
        samples, chars_per_s = make_samples(model, ckpt["vocab"], args)
        print("\n".join(samples))
        print(f"sampling {chars_per_s:,.0f} chars/s ({layer_class(model)}, "
              f"backend {resolved_backend(model.eval(), 1, 1)!r})")
        return
    # the recurrent stack only; embedding and head stay float32
    quantized = rnnfast.quantize_dynamic(copy.deepcopy(model).eval())
    _, _, val_data = split_corpus(cfg, ckpt["vocab"])
    val_x, val_y = streams(val_data, cfg.batch)
    report: dict = dict(checkpoint=str(Path(args.out) / "ckpt.pt"), kernel=rnnfast.quantize.kernel_isa(),
                        val_chars=val_y.numel(), threads=args.threads, torch=torch.__version__)
    for name, m in (("float32", model), ("int8", quantized)):
        samples, chars_per_s = make_samples(m, ckpt["vocab"], args)
        report[name] = dict(val_loss=evaluate(m, val_x, val_y, cfg.seq_len), sample_chars_per_s=chars_per_s,
                            layer_class=layer_class(m), first_sample=samples[0])
    report["val_loss_increase"] = report["int8"]["val_loss"] - report["float32"]["val_loss"]
    report["sampling_speedup"] = report["int8"]["sample_chars_per_s"] / report["float32"]["sample_chars_per_s"]
    print(report["int8"]["first_sample"])
    for name in ("float32", "int8"):
        r = report[name]
        print(f"{name}: validation {r['val_loss']:.4f} nats/char, sampling {r['sample_chars_per_s']:,.0f} chars/s "
              f"({r['layer_class']})")
    (Path(args.out) / "int8.json").write_text(json.dumps(report, indent=2))
    print(f"int8 costs {report['val_loss_increase']:+.4f} nats/char, samples {report['sampling_speedup']:.2f}x "
          f"as fast (kernel {report['kernel']}); written to {args.out}/int8.json")


# ---------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the ``train`` / ``sample`` command line (``--smoke`` swaps in the tiny settings)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/charlm", help="run directory (checkpoint and outputs)")
    common.add_argument("--backend", default="auto", help="rnnfast backend: auto, reference, cpu, triton, ...")
    common.add_argument("--torch-layers", action="store_true", help="use torch.nn layers instead (same init)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--prompt", default="ROMEO:\n")
    common.add_argument("--sample-chars", type=int, default=400, help="length of each sample")
    common.add_argument("--temperature", type=float, nargs="+", default=list(TEMPERATURES))
    common.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest characters (0: all)")
    common.add_argument("--beam", type=int, default=5, help="beam-search width (0: no beam search)")

    t = sub.add_parser("train", parents=[common], help="train, evaluate and sample")
    t.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm", help="rnn: Elman, tanh")
    t.add_argument("--embed", type=int, default=64)
    t.add_argument("--hidden", type=int, default=384)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--seq-len", type=int, default=128, help="truncated-BPTT length")
    t.add_argument("--batch", type=int, default=32, help="parallel streams per batch")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: forward and backward under torch.autocast in bfloat16 (float32 weights)")
    t.add_argument("--warmup", type=int, default=30, help="warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    t.add_argument("--minutes", type=float, default=5.0, help="training time budget (evaluation excluded)")
    t.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps (0: no limit)")
    t.add_argument("--eval-every", type=float, default=30.0, help="seconds of training between evaluations")
    t.add_argument("--eval-chars", type=int, default=32_000, help="validation chars per periodic evaluation")
    t.add_argument("--data", default=str(DATA))
    t.add_argument("--data-chars", type=int, default=0, help="use only the corpus's first N chars (0: all)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    t.add_argument("--smoke", action="store_true", help="tiny model and data, for tests")
    t.set_defaults(func=train)
    s = sub.add_parser("sample", parents=[common], help="sample from OUT/ckpt.pt")
    s.add_argument("--quantize", choices=("int8",), help="int8 recurrent layers (rnnfast.quantize_dynamic)")
    s.set_defaults(func=sample_cmd)

    args = p.parse_args(argv)
    if args.command == "train" and args.smoke:  # flags given explicitly still win
        t.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: ``train`` or ``sample``."""
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
