"""Swap a model's torch.nn.LSTM for rnnfast's, check the numbers match, time both.

    python examples/quickstart.py [--backend auto]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import rnnfast


class Tagger(nn.Module):
    """A small sequence tagger: embedding -> 2-layer bidirectional LSTM -> linear."""

    def __init__(self, vocab: int = 100, hidden: int = 128, tags: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = nn.LSTM(64, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def median_ms(fn, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    torch.manual_seed(0)

    model = Tagger()
    fast = rnnfast.convert(copy.deepcopy(model), backend=args.backend)  # same weights, rnnfast layers
    print("backends usable here:", rnnfast.available_backends())
    print("converted layer:", fast.rnn)

    tokens = torch.randint(0, 100, (32, 50))
    want, got = model(tokens), fast(tokens)
    print(f"max |torch.nn - rnnfast| on the outputs: {(want - got).abs().max().item():.2e}")
    want.square().mean().backward()
    got.square().mean().backward()
    grad_err = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), fast.parameters()))
    print(f"max |torch.nn - rnnfast| on the gradients: {grad_err:.2e}")

    def train_step(m: nn.Module):
        return lambda: m(tokens).square().mean().backward()

    with torch.no_grad():
        t_fwd = median_ms(lambda: model(tokens)), median_ms(lambda: fast(tokens))
    t_train = median_ms(train_step(model)), median_ms(train_step(fast))
    print(f"forward  (B32 T50): torch.nn {t_fwd[0]:7.2f} ms   rnnfast {t_fwd[1]:7.2f} ms   "
          f"speed-up {t_fwd[0] / t_fwd[1]:.2f}x")
    print(f"fwd+bwd  (B32 T50): torch.nn {t_train[0]:7.2f} ms   rnnfast {t_train[1]:7.2f} ms   "
          f"speed-up {t_train[0] / t_train[1]:.2f}x")


if __name__ == "__main__":
    main()
