"""Shared pieces of the rnnfast Triton kernels: mode ids, activations, tuning
configs and the choice between the step and the sequence kernels (all in one
place)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime import Autotuner, Heuristics

from ..backend import GATES, MODE_ID, MODES

# mode ids passed to the kernels as constexpr (rnnfast.backend.MODE_ID)
LSTM, GRU, RNN_TANH, RNN_RELU = (MODE_ID[m] for m in MODES)
NUM_GATES = {MODE_ID[m]: GATES[m] for m in MODES}
# per row and hidden unit, what the forward saves for backward: LSTM i,f,g,o;
# GRU r,z,n and the hidden n pre-activation; RNN the activation
NUM_SAVED = {LSTM: 4, GRU: 4, RNN_TANH: 1, RNN_RELU: 1}

# the sequence kernel holds a row tile's whole hidden state on chip and loads
# whole (padded hidden x padded hidden) W_hh gate tiles every step: it pays
# while the padded hidden (and projection) size stays this small (measured:
# see sequence_max_hidden); the step kernels take over above it.
SEQUENCE_MAX_HIDDEN = 128


def is_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    """Whether kernels autotune on the GPU (``RNNFAST_TRITON_AUTOTUNE=0`` keeps one
    config per kernel, which compiles much faster: tests use it)."""
    return not is_interpreting() and os.environ.get("RNNFAST_TRITON_AUTOTUNE", "1") != "0"


def quick_bench(kernel_call, quantiles):
    """Autotuning timer: a short warmup and repetition keep tuning cheap."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision.

    float32: ``"tf32"`` when torch's matmul TF32 switch is on, else ``"tf32x3"``
    (three TF32 tensor-core products, about float32 accuracy): Triton lowers
    ``"ieee"`` float32 dots to FMA loops, which at the sequence kernel's tile
    sizes spill to local memory and ran ~0.7 ms per step on an H200. Other
    dtypes: ``"ieee"`` (16-bit inputs are exact in the tensor cores; float64
    has no TF32). The Triton interpreter ignores the setting.
    """
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def sequence_max_hidden(dtype: torch.dtype) -> int:
    """Largest padded hidden/projection size that ``"auto"`` runs on the sequence kernel.

    Measured on an H200 (bench/results/2026-11-26-nvidia-h200.md, "step-kernels
    ms" column): bfloat16 at padded H=128 ran 2.7-4.6x faster than cuDNN, but at
    H=256 slower than the step kernels (GRU T100 B1 fwd 22.5 vs 8.8 ms); float32
    (3xTF32 dots) was slower than the step kernels even at H=128 (19.0 vs 5.5 ms).
    So on a GPU only 16-bit dtypes up to 128 take it. Under the interpreter every
    dtype uses the 128 limit, so that CI's float32/float64 parity runs cover both kernels.
    """
    if dtype in (torch.float16, torch.bfloat16) or is_interpreting():
        return SEQUENCE_MAX_HIDDEN
    return 0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and cell-state dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_block(n: int) -> int:
    """A block covering ``n`` whole: a power of two, at least 16 (``tl.dot``'s minimum on GPUs)."""
    return max(16, triton.next_power_of_2(n))


def use_sequence_kernel(kernel: str, hidden_size: int, out_size: int, mode: int = -1,
                        dtype: torch.dtype = torch.float32, backward: bool = False) -> bool:
    """Whether a layer direction runs the sequence kernel (else the step kernels).

    ``kernel`` is ``"auto"`` (the sequence kernel while the padded hidden and
    output sizes stay within :func:`sequence_max_hidden` for ``dtype``), ``"step"``
    or ``"sequence"``. The
    float32 LSTM backward takes the step kernels when its dots would be IEEE
    (``dot_precision`` ``"ieee"``): compiling that sequence kernel (IEEE fp32
    dots lowered to FMAs) aborts in LLVM's SLP vectorizer with triton 3.9 for
    sm_90. With ``"tf32x3"``/``"tf32"`` (the float32 default) it compiles.
    """
    if kernel not in ("auto", "step", "sequence"):
        raise ValueError(f"kernel must be 'auto', 'step' or 'sequence', got {kernel!r}")
    if backward and mode == LSTM and dtype == torch.float32 and dot_precision(dtype) == "ieee":
        return False
    if kernel != "auto":
        return kernel == "sequence"
    return max(dot_block(hidden_size), dot_block(out_size)) <= sequence_max_hidden(dtype)


def step_configs() -> list[triton.Config]:
    """Tile sizes for the step kernels (keyed on B and the hidden sizes, never T): small row
    tiles with narrow hidden tiles keep SMs busy at small B, large row tiles share W_hh at large B."""
    if not autotuning():
        return [triton.Config({"BLOCK_B": 16, "BLOCK_H": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bb, bh, bk, w, s in [(16, 16, 64, 2, 3), (16, 32, 64, 4, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3)]
    ]


def sequence_configs() -> list[triton.Config]:
    """Row-tile sizes for the sequence kernel (keyed on B and the hidden sizes, never T)."""
    if not autotuning():
        return [triton.Config({"BLOCK_B": 16}, num_warps=4, num_stages=1)]
    # one stage: pipelining the time loop would multi-buffer the W_hh tiles
    return [triton.Config({"BLOCK_B": bb}, num_warps=w, num_stages=1) for bb, w in [(16, 4), (32, 8)]]


def full_arguments(kernel, args: tuple, consts: dict) -> dict:
    """Every parameter of ``kernel`` (an autotuned and/or heuristics-wrapped ``triton.jit``
    function) by name, as its launch ``kernel[grid](*args, **consts)`` binds them: the
    positional ``args``, ``consts``, the autotuner's chosen config (after that launch) and
    the heuristics' values, in the kernel's parameter order."""
    tuner = heur = None
    fn = kernel
    while isinstance(fn, (Autotuner, Heuristics)):
        if isinstance(fn, Autotuner):
            tuner = fn
        else:
            heur = fn
        fn = fn.fn
    named = {**dict(zip(fn.arg_names, args)), **consts}
    if tuner is not None:
        named.update(tuner.best_config.kwargs)
    if heur is not None:
        for name, value in heur.values.items():
            named[name] = value(named)
    return {name: named[name] for name in fn.arg_names}


class PreboundLaunch:
    """Launches of one kernel in a step loop without Triton's per-launch host work.

    The first call launches through ``kernel[grid]`` (autotuner, heuristics and argument
    binder: about 15 us of host time per launch, measured on a CPU, before the launch
    itself); later calls reuse its compiled kernel, grid and constant arguments and hand
    the new argument values straight to the launcher. Valid only while every later call
    matches the first in what Triton specialises on (the same ``None`` arguments, 16-byte
    pointer alignment, integers other than ``do_not_specialize`` ones): callers check that
    with :func:`aligned_by_time` and otherwise pass ``bind=False``. Under the interpreter
    every call goes through ``kernel[grid]``. Not yet run on a GPU.
    """

    def __init__(self, kernel, grid, consts: dict, bind: bool = True):
        self.kernel, self.grid, self.consts = kernel, grid, consts
        self.bind = bind and not is_interpreting()
        self.bound = None

    def __call__(self, *args) -> None:
        if self.bound is None:
            compiled = self.kernel[self.grid](*args, **self.consts)
            if self.bind and compiled is not None:
                named = full_arguments(self.kernel, args, self.consts)
                grid = tuple(self.grid(named) if callable(self.grid) else self.grid) + (1, 1)
                device = triton.runtime.driver.active.get_current_device()
                stream = triton.runtime.driver.active.get_current_stream(device)
                self.bound = (compiled, grid[:3], tuple(named.values())[len(args):], stream)
            return
        compiled, grid, tail, stream = self.bound
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)


def aligned_by_time(*buffers) -> bool:
    """Whether every per-time view ``b[t]`` of these ``(T, ...)`` buffers starts on a 16-byte
    boundary (Triton specialises pointer arguments on it): the condition for
    :class:`PreboundLaunch` over a step loop. ``None`` entries are skipped."""
    return all(b.data_ptr() % 16 == 0 and b.stride(0) * b.element_size() % 16 == 0 for b in buffers if b is not None)


def prune_by_batch(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose row tile is larger than the batch needs."""
    cap = max(16, triton.next_power_of_2(named_args["B"]))
    return [c for c in configs if c.kwargs["BLOCK_B"] <= cap] or configs[:1]


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def cell_update(MODE: tl.constexpr, b_a0, b_a1, b_a2, b_a3, b_h, b_c):
    """Gate nonlinearities and state update of one tile.

    ``b_a*`` are the pre-activations (LSTM: i, f, g, o; GRU: r, z and the
    input and hidden parts of n; RNN: ``b_a0``); ``b_h``/``b_c`` the previous
    state. Returns ``(h', c', s0, s1, s2, s3)``, ``s*`` being what backward needs.
    """
    if MODE == 0:
        b_i, b_f, b_g, b_o = sigmoid(b_a0), sigmoid(b_a1), tanh(b_a2), sigmoid(b_a3)
        b_c_new = b_f * b_c + b_i * b_g
        return b_o * tanh(b_c_new), b_c_new, b_i, b_f, b_g, b_o
    elif MODE == 1:
        b_r, b_z = sigmoid(b_a0), sigmoid(b_a1)
        b_n = tanh(b_a2 + b_r * b_a3)
        return (1.0 - b_z) * b_n + b_z * b_h, b_c, b_r, b_z, b_n, b_a3
    elif MODE == 2:
        b_y = tanh(b_a0)
        return b_y, b_c, b_y, b_y, b_y, b_y
    else:
        b_y = tl.where(b_a0 < 0.0, 0.0, b_a0)  # NaN passes, as torch's relu lets it (tl.maximum drops it on GPUs)
        return b_y, b_c, b_y, b_y, b_y, b_y


@triton.jit
def cell_grads(MODE: tl.constexpr, b_dm, b_dc, b_s0, b_s1, b_s2, b_s3, b_c, b_cp, b_hp):
    """Pre-activation gradients of one tile from ``b_dm`` (gradient of the cell's
    output before projection) and, for LSTM, ``b_dc``; ``b_s*`` are the saved
    gates (see :func:`cell_update`), ``b_c``/``b_cp`` the new and previous cell
    state (LSTM), ``b_hp`` the previous hidden state (GRU).

    Returns ``(d0, d1, d2, d3, x)``: LSTM: the four gate gradients and ``dc_prev``;
    GRU: r, z, n (input side), n (hidden side, ``dn * r``) and the direct
    ``dh_prev`` term ``dh * z``; RNN: the gradient in every slot.
    """
    if MODE == 0:
        b_tc = tanh(b_c)
        b_dct = b_dc + b_dm * b_s3 * (1.0 - b_tc * b_tc)
        b_d0 = b_dct * b_s2 * b_s0 * (1.0 - b_s0)
        b_d1 = b_dct * b_cp * b_s1 * (1.0 - b_s1)
        b_d2 = b_dct * b_s0 * (1.0 - b_s2 * b_s2)
        b_d3 = b_dm * b_tc * b_s3 * (1.0 - b_s3)
        return b_d0, b_d1, b_d2, b_d3, b_dct * b_s1
    elif MODE == 1:
        b_dn = b_dm * (1.0 - b_s1) * (1.0 - b_s2 * b_s2)
        b_d0 = b_dn * b_s3 * b_s0 * (1.0 - b_s0)
        b_d1 = b_dm * (b_hp - b_s2) * b_s1 * (1.0 - b_s1)
        return b_d0, b_d1, b_dn, b_dn * b_s0, b_dm * b_s1
    elif MODE == 2:
        b_d = b_dm * (1.0 - b_s0 * b_s0)
        return b_d, b_d, b_d, b_d, b_d
    else:
        b_d = tl.where(b_s0 <= 0, 0., b_dm)  # a NaN output passes the gradient, as torch's relu backward
        return b_d, b_d, b_d, b_d, b_d


@triton.jit
def tile(i_r, i_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, R, C):
    """Tile ``(i_r, i_c)`` of an ``(R, C)`` grid: int64 row offsets, column offsets,
    their masks and the 2-D mask ``(o_r, o_c, m_r, m_c, m_rc)``."""
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_r, m_c = o_r < R, o_c < C
    return o_r, o_c, m_r, m_c, m_r[:, None] & m_c[None, :]


@triton.jit
def load_gates(p, stride, mask, N: tl.constexpr):
    """``N`` (1, 3 or 4) gate tiles at ``p + g * stride`` (masked to 0); absent ones repeat the first."""
    b_0 = tl.load(p, mask=mask, other=0.)
    b_1, b_2, b_3 = b_0, b_0, b_0
    if N > 1:
        b_1 = tl.load(p + stride, mask=mask, other=0.)
        b_2 = tl.load(p + 2 * stride, mask=mask, other=0.)
    if N > 3:
        b_3 = tl.load(p + 3 * stride, mask=mask, other=0.)
    return b_0, b_1, b_2, b_3


@triton.jit
def store_gates(p, stride, mask, N: tl.constexpr, b_0, b_1, b_2, b_3):
    """Store ``N`` (1, 3 or 4) gate tiles at ``p + g * stride`` (the inverse of :func:`load_gates`)."""
    T_P = p.dtype.element_ty
    tl.store(p, b_0.to(T_P), mask=mask)
    if N > 1:
        tl.store(p + stride, b_1.to(T_P), mask=mask)
        tl.store(p + 2 * stride, b_2.to(T_P), mask=mask)
    if N > 3:
        tl.store(p + 3 * stride, b_3.to(T_P), mask=mask)


@triton.jit
def gate_dots(a, sa, ga, o_b, m_b, w, swk, swn, gw, o_n, m_n, K, NG: tl.constexpr, A_PER_GATE: tl.constexpr,
              ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """K-tiled ``A_g[o_b, :K] @ W_g[:K, o_n]`` for the ``NG`` gates, operands read from memory.

    ``A_g[b, k] = a[g * ga + b * sa + k]`` (``A_PER_GATE`` false: one ``A`` for every gate),
    ``W_g[k, n] = w[g * gw + k * swk + n * swn]``. Returns four accumulators (absent gates: zeros).
    """
    b_a0 = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC)
    b_a1, b_a2, b_a3 = b_a0, b_a0, b_a0
    for i_k in range(0, tl.cdiv(K, BLOCK_K)):
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        p_a = a + o_b[:, None] * sa + o_k[None, :]
        m_a = m_b[:, None] & m_k[None, :]
        T_W = w.dtype.element_ty  # A is cast to the weights' dtype (an accumulation-dtype dh)
        if A_PER_GATE:
            b_x0, b_x1, b_x2, b_x3 = load_gates(p_a, ga, m_a, NG)
        else:
            b_x0 = tl.load(p_a, mask=m_a, other=0.)
            b_x1, b_x2, b_x3 = b_x0, b_x0, b_x0
        b_x0, b_x1, b_x2, b_x3 = b_x0.to(T_W), b_x1.to(T_W), b_x2.to(T_W), b_x3.to(T_W)
        b_w0, b_w1, b_w2, b_w3 = load_gates(w + o_k[:, None].to(tl.int64) * swk + o_n[None, :].to(tl.int64) * swn,
                                            gw, m_k[:, None] & m_n[None, :], NG)
        b_a0 = tl.dot(b_x0, b_w0, b_a0, input_precision=PRECISION)
        if NG > 1:
            b_a1 = tl.dot(b_x1, b_w1, b_a1, input_precision=PRECISION)
            b_a2 = tl.dot(b_x2, b_w2, b_a2, input_precision=PRECISION)
        if NG > 3:
            b_a3 = tl.dot(b_x3, b_w3, b_a3, input_precision=PRECISION)
    return b_a0, b_a1, b_a2, b_a3


@triton.jit
def gate_grads(MODE: tl.constexpr, NS: tl.constexpr, ACC: tl.constexpr, b_dm, b_dc, m_act, p_g, H, mask, p_c, p_cp,
               p_hp):
    """Pre-activation gradients of one tile, zero on inactive rows (see :func:`cell_grads`).

    ``b_dm`` is the gradient of the cell's output (zero on inactive rows), ``p_g`` the saved
    gates (``NS`` tiles ``H`` apart), ``p_c``/``p_cp`` the new and previous cell state (LSTM),
    ``p_hp`` the previous hidden state (GRU). Returns ``(d0, d1, d2, d3, x, dc)``: ``x`` as
    in :func:`cell_grads`, ``dc`` the LSTM cell gradient passed back (kept on inactive rows).
    """
    b_s0, b_s1, b_s2, b_s3 = load_gates(p_g, H, mask, NS)
    b_c, b_cp, b_hp = b_dm, b_dm, b_dm
    if MODE == 0:
        b_c = tl.load(p_c, mask=mask, other=0.)
        b_cp = tl.load(p_cp, mask=mask, other=0.)
    if MODE == 1:
        b_hp = tl.load(p_hp, mask=mask, other=0.).to(ACC)
    b_d0, b_d1, b_d2, b_d3, b_x = cell_grads(MODE, b_dm, b_dc, b_s0, b_s1, b_s2, b_s3, b_c, b_cp, b_hp)
    if MODE == 0:
        b_dc = tl.where(m_act, b_x, b_dc)
    return (tl.where(m_act, b_d0, 0.), tl.where(m_act, b_d1, 0.), tl.where(m_act, b_d2, 0.),
            tl.where(m_act, b_d3, 0.), b_x, b_dc)


@triton.jit
def active_rows(bs, t, o_b, m_b, HAS_BS: tl.constexpr):
    """``(BLOCK_B, 1)`` mask of the rows active at time ``t`` (packed: below ``batch_sizes[t]``)."""
    m_act = m_b
    if HAS_BS:
        m_act = o_b < tl.load(bs + t)
    return m_act[:, None]
