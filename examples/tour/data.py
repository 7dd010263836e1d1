"""Data sets of the tour, built from files that ship with the project or generated.

- Speaker identification: the speeches of Tiny Shakespeare's most frequent
  speakers, as word ids, with a seeded held-out split.
- Date normalisation: dates written in varied human formats, to translate into
  ISO 8601 (``YYYY-MM-DD``) character by character.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"
PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


class Vocab:
    """Token <-> id map; ids 0..3 are ``<pad>``, ``<unk>``, ``<s>``, ``</s>``."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.itos = list(SPECIALS) + sorted(set(tokens) - set(SPECIALS))
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def from_counts(cls, sequences: Iterable[Sequence[str]], min_count: int = 1) -> "Vocab":
        """The tokens seen at least ``min_count`` times in ``sequences``."""
        counts = Counter(t for seq in sequences for t in seq)
        return cls(t for t, c in counts.items() if c >= min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str], bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``tokens`` (``<unk>`` for unknown ones), optionally framed by ``<s>`` / ``</s>``."""
        ids = [self.stoi.get(t, UNK) for t in tokens]
        return [BOS] * bos + ids + [EOS] * eos

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` up to the first ``</s>``, special tokens left out."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return out


def pad_batch(seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids ``(B, T_max)`` (``<pad>`` = 0) and the lengths ``(B,)``, int64."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), PAD, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


# ---------------------------------------------------------------- who speaks?

def tokenize(text: str) -> list[str]:
    """Lower-cased words (apostrophes kept) and punctuation marks."""
    return re.findall(r"[a-z']+|[^\sa-z']", text.lower())


def speeches(path: Path = SHAKESPEARE) -> list[tuple[str, str]]:
    """``(speaker, text)`` of every speech: a block that opens with a ``NAME:`` line."""
    out = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0][:-1], " ".join(lines[1:])))
    return out


@dataclass
class SpeakerData:
    """Word-id sequences with speaker labels, split into train and held-out test."""

    vocab: Vocab
    speakers: list[str]
    train: list[tuple[list[int], int]]
    test: list[tuple[list[int], int]]

    def majority_accuracy(self) -> float:
        """Test accuracy of always answering the most frequent training speaker."""
        top = Counter(y for _, y in self.train).most_common(1)[0][0]
        return sum(y == top for _, y in self.test) / len(self.test)


def speaker_data(n_speakers: int = 5, test_frac: float = 0.2, max_tokens: int = 80, min_count: int = 2,
                 seed: int = 0, path: Path = SHAKESPEARE) -> SpeakerData:
    """Speeches of the ``n_speakers`` most frequent speakers, first ``max_tokens`` words each.

    The split is a seeded shuffle of the speeches; the vocabulary comes from the
    training speeches only (words seen ``min_count`` times), so test speeches
    meet unknown words as new text would.
    """
    all_speeches = speeches(path)
    speakers = [s for s, _ in Counter(s for s, _ in all_speeches).most_common(n_speakers)]
    label = {s: i for i, s in enumerate(speakers)}
    items = [(tokenize(text)[:max_tokens], label[s]) for s, text in all_speeches if s in label]
    random.Random(seed).shuffle(items)
    n_test = round(test_frac * len(items))
    test, train = items[:n_test], items[n_test:]
    vocab = Vocab.from_counts((words for words, _ in train), min_count)
    return SpeakerData(vocab, speakers, [(vocab.encode(w), y) for w, y in train],
                       [(vocab.encode(w), y) for w, y in test])


# ---------------------------------------------------------------- dates -> ISO 8601

MONTHS = list(calendar.month_name)[1:]
FIRST_DAY, LAST_DAY = dt.date(1950, 1, 1), dt.date(2049, 12, 31)
SOURCE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,./-"
TARGET_CHARS = "0123456789-"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# Human formats; two-digit years mean 1950-2049 (50..99 -> 19xx, 00..49 -> 20xx), numeric ones are day first.
DATE_FORMATS = (
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                     # 3 March 2021
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                    # March 3, 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day:02d} {d.year}",             # Mar 03 2021
    lambda d: f"{calendar.day_name[d.weekday()]}, {d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # Wednesday, 3 Mar 2021
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",    # the 3rd of March 2021
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",                         # 03.03.2021
    lambda d: f"{d.day}/{d.month}/{d.year % 100:02d}",                       # 3/3/21
    lambda d: f"{d.year}/{d.month}/{d.day}",                                 # 2021/3/3
)


def human_date(d: dt.date, rng: random.Random) -> str:
    """``d`` in a random format of ``DATE_FORMATS``, sometimes lower- or upper-cased."""
    text = rng.choice(DATE_FORMATS)(d)
    case = rng.random()
    return text.lower() if case < 0.2 else text.upper() if case < 0.3 else text


def date_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` pairs (human date, ISO 8601 date) of uniformly drawn days in 1950-2049."""
    rng = random.Random(seed)
    span = (LAST_DAY - FIRST_DAY).days
    days = [FIRST_DAY + dt.timedelta(days=rng.randrange(span + 1)) for _ in range(n)]
    return [(human_date(d, rng), d.isoformat()) for d in days]
