"""A tour of recurrent networks, every recurrent core an rnnfast layer or cell.

One demonstration after another, each printing what it shows:

1. layers: RNN (tanh, relu), LSTM and GRU with their arguments; shapes of the
   input, output and states next to torch.nn's, and the outputs agreeing;
   an RNNCell loop reproducing the RNN layer.
2. classification: who speaks a speech of Tiny Shakespeare (five most frequent
   speakers, held-out split): padding, pack_padded_sequence and
   pad_packed_sequence, a bidirectional 2-layer LSTM, final state vs mean of
   the outputs, against the majority class.
3. encoder-decoder: dates in varied human formats -> ISO 8601, a bidirectional
   encoder and an attention decoder cell trained with teacher forcing; greedy
   and beam-search exact match; an attention heat-map. Trained with each of
   RNN, LSTM and GRU on the same time budget: the comparison of the three.
4. practice (in the code of all of the above, summarised at the end): gradient
   clipping, orthogonal recurrent initialisation with forget-gate bias 1,
   dropout between stacked layers.

    python examples/recurrent_neural_networks.py --quick      # about 4 minutes on 2 CPU cores
    python examples/recurrent_neural_networks.py              # longer training budgets
    python examples/recurrent_neural_networks.py --quick --out examples/results/tour   # refresh committed results

Writes ``summary.json``, ``attention.png`` and ``cells.png`` to ``--out`` (default ``runs/tour``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tour.data import DATE_FORMATS, PAD, SOURCE_CHARS, TARGET_CHARS, Vocab, date_pairs, pad_batch, speaker_data  # noqa: E402
from tour.nets import LAYERS, Seq2Seq, SequenceClassifier, shuffled_batches, train_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shapes(*tensors) -> str:
    """``(5, 3, 10)``-style shapes, joined."""
    return " ".join(str(tuple(t.shape)) for t in tensors)


def flat_state(out) -> tuple[Tensor, list[Tensor]]:
    """``(output, [h_n] or [h_n, c_n])`` from a layer's return value."""
    y, state = out
    return y, list(state) if isinstance(state, tuple) else [state]


# ---------------------------------------------------------------- 1. layers

LAYER_CASES = [
    # (class name, constructor kwargs, input shape, initial state shapes)
    ("RNN", dict(input_size=10, hidden_size=20, num_layers=2), (5, 3, 10), [(2, 3, 20)]),
    ("RNN", dict(input_size=10, hidden_size=20, nonlinearity="relu", batch_first=True), (3, 5, 10), []),
    ("LSTM", dict(input_size=10, hidden_size=20, num_layers=2, bidirectional=True), (5, 3, 10), [(4, 3, 20), (4, 3, 20)]),
    ("LSTM", dict(input_size=10, hidden_size=20, proj_size=8, batch_first=True), (3, 5, 10), [(1, 3, 8), (1, 3, 20)]),
    ("GRU", dict(input_size=10, hidden_size=20, bidirectional=True, bias=False), (5, 3, 10), []),
    ("GRU", dict(input_size=10, hidden_size=20, num_layers=3, dropout=0.2), (5, 10), [(3, 20)]),  # unbatched
]


def demo_layers() -> dict:
    """Each layer next to its torch.nn twin (same weights): shapes, agreement, and an RNNCell loop."""
    print("\n=== 1. layers: rnnfast next to torch.nn (same weights, eval mode) ===")
    torch.manual_seed(0)
    results = []
    for name, kw, in_shape, state_shapes in LAYER_CASES:
        ours = getattr(rnnfast, name)(**kw).eval()
        theirs = getattr(nn, name)(**kw).eval()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(in_shape)
        init = [torch.randn(s) for s in state_shapes]
        args = (x,) if not init else (x, init[0] if len(init) == 1 else tuple(init))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LSTM with projections")  # torch.nn's note that oneDNN lacks proj_size
            y1, s1 = flat_state(ours(*args))
            y2, s2 = flat_state(theirs(*args))
        diff = max((a - b).abs().max().item() for a, b in zip([y1, *s1], [y2, *s2]))
        assert [t.shape for t in [y1, *s1]] == [t.shape for t in [y2, *s2]]
        kwargs = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        print(f"{name}({kwargs})  backend {ours.resolved_backend(x)!r}")
        print(f"   input {shapes(x)}{'  initial state ' + shapes(*init) if init else ''}")
        print(f"   output {shapes(y1)}  state {shapes(*s1)}   torch.nn: output {shapes(y2)}  state {shapes(*s2)}"
              f"   max |diff| {diff:.1e}")
        results.append(dict(layer=f"{name}({kwargs})", input=list(in_shape), output=list(y1.shape),
                            state=[list(s.shape) for s in s1], max_abs_diff=diff))
        if name == "LSTM" and kw.get("bidirectional"):
            H = kw["hidden_size"]
            # h_n is (num_layers * 2, B, H): the last layer's forward direction ends at the last step,
            # its backward direction at the first; the output concatenates the two directions.
            fwd_ok = torch.equal(y1[-1, :, :H], s1[0][-2])
            bwd_ok = torch.equal(y1[0, :, H:], s1[0][-1])
            print(f"   bidirectional layout: output[-1, :, :H] == h_n[-2] {fwd_ok}, output[0, :, H:] == h_n[-1] {bwd_ok}")
    # A cell is one step: a loop over time with rnnfast.RNNCell gives the rnnfast.RNN layer's output.
    layer = rnnfast.RNN(10, 20)
    cell = rnnfast.RNNCell(10, 20)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()})
    x = torch.randn(7, 3, 10)
    with torch.no_grad():
        h, steps = torch.zeros(3, 20), []
        for t in range(x.size(0)):
            h = cell(x[t], h)
            steps.append(h)
        cell_diff = (torch.stack(steps) - layer(x)[0]).abs().max().item()
    print(f"RNNCell(10, 20) looped over 7 steps vs RNN(10, 20): max |diff| {cell_diff:.1e}")
    return dict(layers=results, rnncell_loop_max_abs_diff=cell_diff)


# ---------------------------------------------------------------- 2. classification with packing

def classify_batch(items: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor, Tensor]:
    ids, lengths = pad_batch([s for s, _ in items])
    return ids, lengths, torch.tensor([y for _, y in items])


@torch.no_grad()
def accuracy(model: nn.Module, items: list[tuple[list[int], int]]) -> float:
    ids, lengths, y = classify_batch(items)
    return (model(ids, lengths).argmax(-1) == y).float().mean().item()


def demo_classification(seconds: float, seed: int) -> dict:
    """Who speaks? Two readouts of the same packed bidirectional LSTM, against the majority class."""
    print("\n=== 2. many-to-one classification: who speaks this Tiny Shakespeare speech? ===")
    data = speaker_data(seed=seed)
    majority = data.majority_accuracy()
    print(f"speakers {data.speakers}; {len(data.train)} train / {len(data.test)} held-out speeches "
          f"(first 80 words), vocabulary {len(data.vocab)} words from the training split")
    ids, lengths, _ = classify_batch(data.train[:4])
    packed = pack_padded_sequence(torch.zeros(*ids.shape, 1), lengths, batch_first=True, enforce_sorted=False)
    print(f"padding: 4 speeches of lengths {lengths.tolist()} -> ids {shapes(ids)} (pad id {PAD}); "
          f"packed: data {shapes(packed.data)}, batch_sizes {packed.batch_sizes.tolist()[:8]}... "
          f"(rows still running at each step), sorted_indices {packed.sorted_indices.tolist()}")

    def loss_fn(model: nn.Module, batch: list) -> Tensor:
        ids, lengths, y = classify_batch(batch)
        return F.cross_entropy(model(ids, lengths), y)

    runs = {}
    for readout in ("final", "mean"):
        torch.manual_seed(seed)
        model = SequenceClassifier(len(data.vocab), len(data.speakers), readout=readout)
        stats = train_for(model, shuffled_batches(data.train, 32, seed), loss_fn, seconds)
        acc = accuracy(model, data.test)
        runs[readout] = dict(test_accuracy=acc, train_accuracy=accuracy(model, data.train), **stats)
        what = "final states h_n[-2], h_n[-1]" if readout == "final" else "outputs averaged over real tokens"
        print(f"readout {readout:5s} ({what}): held-out accuracy {acc:.3f} "
              f"(train {runs[readout]['train_accuracy']:.3f}) after {stats['steps']} steps, {stats['seconds']:.0f} s")
    print(f"majority class ({data.speakers[0]}): {majority:.3f}; chance 1/{len(data.speakers)} = {1 / len(data.speakers):.3f}")
    return dict(speakers=data.speakers, train=len(data.train), test=len(data.test), vocab=len(data.vocab),
                majority_accuracy=majority, model="embedding 64 -> rnnfast.LSTM(64, 96, num_layers=2, "
                "bidirectional=True, dropout=0.3) over packed speeches -> linear", runs=runs)


# ---------------------------------------------------------------- 3. encoder-decoder with attention

SRC, TGT = Vocab(SOURCE_CHARS), Vocab(TARGET_CHARS)
MAX_OUT = 11  # 10 characters and </s>


def date_batch(pairs: list[tuple[str, str]]) -> tuple[Tensor, Tensor, Tensor]:
    """Source ids and lengths, and target ids ``<s> YYYY-MM-DD </s>``."""
    src, lengths = pad_batch([SRC.encode(s) for s, _ in pairs])
    tgt, _ = pad_batch([TGT.encode(t, bos=True, eos=True) for _, t in pairs])
    return src, lengths, tgt


def exact_match(model: Seq2Seq, pairs: list[tuple[str, str]], width: int) -> tuple[float, list[str]]:
    """Fraction of sources decoded to exactly their ISO date, and the decoded strings."""
    src, lengths, _ = date_batch(pairs)
    ids, _ = model.translate(src, lengths, MAX_OUT, width)
    texts = ["".join(TGT.decode(row)) for row in ids.tolist()]
    return sum(t == iso for t, (_, iso) in zip(texts, pairs)) / len(pairs), texts


def plot_attention(model: Seq2Seq, pairs: list[tuple[str, str]], path: Path) -> None:
    """Heat-maps of the attention weights while greedy-decoding a few sources."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, lengths, _ = date_batch(pairs)
    ids, _ = model.translate(src, lengths, MAX_OUT, 1)
    attn = model.attention_map(src, lengths, ids)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4))
    for ax, (text, _), row, a in zip(axes, pairs, ids.tolist(), attn):
        out = TGT.decode(row)
        ax.imshow(a[:len(out), :len(text)].numpy(), cmap="viridis", aspect="auto", vmin=0, vmax=1)
        ax.set_xticks(range(len(text)), list(text), fontsize=8)
        ax.set_yticks(range(len(out)), out, fontsize=8)
        ax.set_title(f"{text!r} -> {''.join(out)}", fontsize=9)
    fig.suptitle(f"attention weights ({model.attention.kind}, {model.cell_kind.upper()} decoder): "
                 "output character (rows) over source characters (columns)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cells(curves: dict[str, list], path: Path) -> None:
    """Training loss against seconds, one line per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for cell, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=cell.upper())
    ax.set_yscale("log")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("teacher-forced cross-entropy (nats/char)")
    ax.set_title("dates -> ISO 8601: RNN vs LSTM vs GRU, same time budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_seq2seq(seconds: float, seed: int, width: int, attention: str, n_test: int, out: Path) -> dict:
    """Dates -> ISO 8601 with each cell on the same budget; greedy and beam exact match; heat-map."""
    print("\n=== 3. encoder-decoder with attention: dates in human formats -> ISO 8601 ===")
    train_pairs = date_pairs(50_000, seed)
    seen = {s for s, _ in train_pairs}
    test_pairs = [p for p in date_pairs(2 * n_test, seed + 1) if p[0] not in seen][:n_test]
    print("examples: " + "; ".join(f"{s!r} -> {t}" for s, t in train_pairs[:5]))
    print(f"{len(train_pairs)} generated training pairs, {len(test_pairs)} held-out sources never seen in training; "
          f"bidirectional encoder over the packed source, decoder cell with {attention} attention "
          f"(padding masked), teacher forcing, {seconds:.0f} s of training per cell")

    def loss_fn(model: Seq2Seq, batch: list) -> Tensor:
        src, lengths, tgt = date_batch(batch)
        logits, _ = model(src, lengths, tgt[:, :-1])  # teacher forcing: the true previous character goes in
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)

    runs, models = {}, {}
    for cell in LAYERS:
        torch.manual_seed(seed)
        model = Seq2Seq(len(SRC), len(TGT), cell=cell, attention=attention)
        stats = train_for(model, shuffled_batches(train_pairs, 64, seed), loss_fn, seconds)
        greedy, _ = exact_match(model, test_pairs, 1)
        beam, texts = exact_match(model, test_pairs, width)
        runs[cell] = dict(greedy_exact_match=greedy, beam_exact_match=beam, beam_width=width,
                          final_train_loss=stats["curve"][-1][1] if stats["curve"] else None, **stats)
        models[cell] = model
        print(f"{cell.upper():4s} (rnnfast.{LAYERS[cell].__name__} encoder, {type(model.decoder).__name__} decoder): "
              f"{stats['steps']} steps in {stats['seconds']:.0f} s, train loss {runs[cell]['final_train_loss']:.4f}; "
              f"exact match greedy {greedy:.3f}, beam {width} {beam:.3f}")
    best = max(runs, key=lambda c: (runs[c]["beam_exact_match"], runs[c]["greedy_exact_match"]))
    _, texts = exact_match(models[best], test_pairs[:6], width)
    print(f"{best.upper()} decodes: " + "; ".join(f"{s!r} -> {t}" for (s, _), t in zip(test_pairs[:6], texts)))
    day = dt.date(1987, 11, 23)
    picks = [(human, day.isoformat()) for human in (DATE_FORMATS[4](day), DATE_FORMATS[3](day), DATE_FORMATS[6](day))]
    plot_attention(models[best], picks, out / "attention.png")
    plot_cells({c: r["curve"] for c, r in runs.items()}, out / "cells.png")
    print(f"attention heat-map of the {best.upper()} model: {out / 'attention.png'}; loss curves: {out / 'cells.png'}")
    return dict(train_pairs=len(train_pairs), test_pairs=len(test_pairs), attention=attention, runs=runs,
                heatmap_model=best, heatmap_sources=[s for s, _ in picks])


# ---------------------------------------------------------------- 4. practice

def practice_summary(summary: dict) -> None:
    """What the training above did about gradients, initialisation and regularisation."""
    print("\n=== 4. practice (in the code above) ===")
    model = Seq2Seq(len(SRC), len(TGT), cell="lstm")
    w = model.decoder.weight_hh.detach()
    H = model.decoder.hidden_size
    ortho = max((b @ b.T - torch.eye(H)).abs().max().item() for b in w.chunk(4))
    forget = model.decoder.bias_ih[H:2 * H].unique().tolist(), model.decoder.bias_hh.abs().max().item()
    print(f"initialisation (tour.nets.init_recurrent): each gate's recurrent matrix orthogonal "
          f"(max |W W^T - I| {ortho:.1e}), forget-gate bias {forget[0]} (bias_hh {forget[1]:.0f}), input weights Xavier")
    print("gradient clipping: clip_grad_norm_(params, 1.0) on every step; steps whose norm exceeded 1.0:")
    for task, key in (("classification", "readout"), ("seq2seq", "cell")):
        for name, r in summary[task]["runs"].items():
            print(f"   {task} {key} {name}: {100 * r['clipped_fraction']:.0f}% of {r['steps']} steps "
                  f"(largest norm {r['max_grad_norm']:.1f})")
    print("dropout: 0.3 on embeddings and features, and between the classifier's two stacked LSTM layers "
          "(the layer's own dropout argument)")
    summary["practice"] = dict(orthogonal_max_error=ortho, forget_bias=forget[0][0], clip=1.0)


# ---------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short budgets: the whole tour in about 4 minutes")
    p.add_argument("--seconds", type=float, help="training seconds per model (default 30 with --quick, else 120)")
    p.add_argument("--test-dates", type=int, default=1000, help="held-out dates for exact match")
    p.add_argument("--beam", type=int, default=5, help="beam width")
    p.add_argument("--attention", choices=("additive", "dot"), default="additive")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 suits small models and a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/tour"))
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 30.0 if args.quick else 120.0
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Run every demonstration; returns (and writes) the summary."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"rnnfast backends here: {rnnfast.available_backends()}; torch {torch.__version__}, {args.threads} threads")
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    summary["layers"] = demo_layers()
    summary["classification"] = demo_classification(args.seconds, args.seed)
    summary["seq2seq"] = demo_seq2seq(args.seconds * 1.5, args.seed, args.beam, args.attention, args.test_dates, args.out)
    practice_summary(summary)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["torch"] = torch.__version__
    summary["backends"] = rnnfast.available_backends()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\ndone in {summary['wall_seconds'] / 60:.1f} min; summary in {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
