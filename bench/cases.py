"""The benchmark grid: one :class:`Case` per shape, mode and dtype, and the named grids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MODES = ("fwd", "fwdbwd", "decode")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Case:
    """One benchmark shape.

    ``mode``: ``fwd`` (a forward without autograd), ``fwdbwd`` (forward and
    backward) or ``decode`` (one step, T=1, state carried from the previous
    step). ``dtype`` is the activations' precision: a provider runs a bfloat16
    case in its own bfloat16 way (a cast module, or autocast). A cell's case
    (``LSTMCell``, ...) is T calls of the cell in a Python loop, the state carried,
    as a decoder with attention steps one.
    """

    family: str  # "LSTM", "GRU" or "RNN", or a cell: "LSTMCell", "GRUCell" or "RNNCell"
    mode: str
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    layers: int = 1
    dtype: str = "float32"

    @property
    def label(self) -> str:
        """The shape as the results files name it (dtype aside), e.g. ``LSTM fwd T100 B64 I256 H256``."""
        if self.mode == "decode":
            shape = f"L{self.layers} I{self.I} H{self.H}" + (f" B{self.B}" if self.B > 1 else "")
        else:
            shape = f"T{self.T} B{self.B} I{self.I} H{self.H}" + (f" L{self.layers}" if self.layers > 1 else "")
        return f"{self.family} {self.mode} {shape}"

    @property
    def cell(self) -> bool:
        return self.family.endswith("Cell")

    @property
    def tokens(self) -> int:
        """Sequence elements one call processes (T * B)."""
        return self.T * self.B

    @property
    def flops(self) -> float:
        """The GEMM work of one call: 2 G H (I + H) per row and step of the first layer (G: 4 gates
        for LSTM, 3 for GRU, 1 for RNN), 2 G H (2 H) per later layer; a forward + backward is 3 times
        the forward (dx and dh, then the weight gradients). The gate math is left out."""
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[self.family.removesuffix("Cell")]
        per_row = 2 * gates * self.H * ((self.I + self.H) + (self.layers - 1) * 2 * self.H)
        return self.T * self.B * per_row * (3 if self.mode == "fwdbwd" else 1)

    @property
    def cost(self) -> float:
        """Relative work (the recurrent GEMMs, plus launches at small sizes) for ordering and budgets."""
        return self.T * self.layers * (max(self.B, 16) * self.H * (self.H + self.I) + 2e5) * (
            3 if self.mode == "fwdbwd" else 1)


def _both_modes(shapes: list[tuple], dtype: str = "float32", modes: tuple = ("fwd", "fwdbwd")) -> list[Case]:
    return [Case(f, m, T, B, I, H, L, dtype) for m in modes for (f, T, B, I, H, L) in shapes]


def cpu_grid() -> list[Case]:
    """The default CPU grid: the 2026-11 shapes (comparable with earlier results), the batch and
    hidden sweeps the plots draw, decode steps, and a bfloat16 subset."""
    shapes = [
        ("LSTM", 100, 64, 256, 256, 1),
        ("GRU", 100, 64, 256, 256, 1),
        ("GRU", 100, 32, 64, 128, 1),
        ("LSTM", 100, 32, 64, 128, 1),
        ("RNN", 100, 64, 256, 256, 1),
        ("LSTM", 100, 8, 256, 256, 1),
        ("LSTM", 100, 256, 256, 256, 1),
        ("LSTM", 100, 64, 512, 512, 1),  # PyTorch's fastrnns default
        ("LSTM", 100, 64, 256, 256, 2),
        # added 2026-12: batch sweep down to 1 and hidden sweep from 128 (I = H, B = 64)
        ("LSTM", 100, 1, 256, 256, 1),
        ("LSTM", 100, 64, 128, 128, 1),
    ]
    decode = [
        Case("LSTM", "decode", 1, 1, 512, 512, 2),
        Case("LSTM", "decode", 1, 1, 128, 128, 2),
        Case("GRU", "decode", 1, 1, 256, 256),
        Case("LSTM", "decode", 1, 1, 1024, 1024),
    ]
    # added 2026-12-06: cells, 10 steps of a Python loop
    cells = [("LSTMCell", 10, 8, 256, 256, 1), ("GRUCell", 10, 8, 256, 256, 1), ("RNNCell", 10, 32, 256, 256, 1),
             ("LSTMCell", 10, 1, 128, 128, 1)]
    bf16 = [shapes[i] for i in (0, 1, 3, 5, 8)]  # LSTM and GRU B64 H256; LSTM B32 H128, B8 H256, 2 layers
    return (_both_modes(shapes) + decode + _both_modes(cells) + _both_modes(bf16, "bfloat16")
            + [Case("LSTM", "decode", 1, 1, 512, 512, 2, "bfloat16")])


def quick_grid() -> list[Case]:
    """Small shapes touching every mode, dtype and provider, with 3-point sweeps for the plots."""
    return (_both_modes([("LSTM", 20, 1, 32, 32, 1), ("LSTM", 20, 8, 32, 32, 1), ("LSTM", 20, 32, 32, 32, 1),
                         ("LSTM", 20, 8, 16, 16, 1), ("LSTM", 20, 8, 64, 64, 1), ("GRU", 20, 8, 32, 32, 1),
                         ("LSTMCell", 5, 8, 32, 32, 1)])
            + [Case("LSTM", "decode", 1, 1, 64, 64, 2), Case("GRU", "decode", 1, 1, 64, 64)]
            + _both_modes([("LSTM", 20, 8, 32, 32, 1)], "bfloat16", ("fwd",)))


def tiny_grid() -> list[Case]:
    """The CI smoke test's grid: one case per mode, a cell's, one bfloat16 case."""
    return [Case("LSTM", "fwd", 4, 2, 8, 8), Case("GRU", "fwdbwd", 4, 2, 8, 8),
            Case("LSTM", "decode", 1, 1, 8, 8, 2), Case("LSTMCell", "fwdbwd", 3, 2, 8, 8),
            Case("LSTM", "fwd", 4, 2, 8, 8, 1, "bfloat16")]


def gpu_grid() -> list[Case]:
    """The GPU grid: LSTM and GRU, float32 (TF32 off) and bfloat16, B 1-256, H (= I) 128-1024,
    T 100 and 1024, forward and forward+backward, plus decode steps.

    Ordered for a time budget: the target configs (B <= 16, H <= 512) and decode first, each
    group cheapest first, so a budget cut drops the most expensive configs outside the targets.
    """
    cases = [Case(f, m, T, B, H, H, 1, d) for d in DTYPES for f in ("LSTM", "GRU") for m in ("fwd", "fwdbwd")
             for T in (100, 1024) for B in (1, 8, 16, 64, 256) for H in (128, 256, 512, 1024)]
    cases += [Case("LSTM", "decode", 1, 1, H, H, 2, d) for d in DTYPES for H in (512, 1024)]
    cases += [Case("GRU", "decode", 1, 1, 256, 256, 1, d) for d in DTYPES]

    def outside_targets(c: Case) -> bool:
        return not (c.B <= 16 and c.H <= 512)

    return sorted(cases, key=lambda c: (outside_targets(c), c.cost, c.dtype, c.family))


GRIDS: dict[str, Callable[[], list[Case]]] = {"cpu": cpu_grid, "quick": quick_grid, "tiny": tiny_grid,
                                               "gpu": gpu_grid}
