"""Persistent sequence kernels: a grid of ``P_h`` hidden slices x ``P_b`` batch groups
runs a whole layer direction, forward or backward, in one launch.

Program ``(i_u, i_b)`` owns hidden units ``U`` (every gate of them) for the batch
rows ``R`` of group ``i_b``. Its slice of ``W_hh`` is loaded once, before the time
loop, and kept on chip (``W_RESIDENT``: in registers, see :data:`RESIDENT_REGS`;
where it does not fit it is re-read from L2 every step, K-tiled). Forward, per
step: wait until every program of the batch group has finished the previous step
(an acquire poll on that step's counter), load ``h_{t-1}[R, :]``, ``tl.dot`` with
the slice, add the precomputed input projection and bias, update the gates, store
``h_t[R, U]`` into the step's own slot of ``hs`` (so no slot is overwritten while
read), then a release increment of the step's counter. The cell state stays on
chip. Backward mirrors it in
reverse time: a program owns the columns ``U`` of ``W_hh``, writes its units'
gate gradients, and after the step's barrier forms ``dh_{t-1}[R, U]`` from every
unit's gate gradients; weight gradients are GEMMs over all steps afterwards.

``SYNC``: on a GPU one cooperative launch (``launch_cooperative_grid``: a grid
that cannot be co-resident fails instead of hanging) covers all steps. Under the
Triton interpreter programs run one after another, so a spin-wait deadlocks:
there the host launches once per step with ``SYNC=False`` and the launch
boundary is the barrier (the same ``P_h`` >= 2 partition). State crossing a
launch boundary (``c``; backward ``dh``, ``dc``) goes through memory at each
launch's ends, so both modes run the same code. Inputs and outputs are those of
:mod:`.sequence` and :mod:`.step` (no projection: ``proj_size`` takes those).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .step import FwdState, alloc_fwd
from .utils import (
    GRU,
    NUM_GATES,
    NUM_SAVED,
    active_rows,
    acc_dtype,
    cell_update,
    dot_block,
    dot_precision,
    gate_dots,
    gate_grads,
    is_interpreting,
    load_gates,
    store_gates,
    tile,
)


@triton.jit
def step_wait(flags, k, n_b, i_b, n_u, SYNC: tl.constexpr):
    """Acquire: wait until all ``n_u`` programs of batch group ``i_b`` finished step ``k - 1``."""
    if SYNC:
        if k > 0:
            tl.atomic_poll(flags + (k - 1) * n_b + i_b, n_u, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def step_done(flags, k, n_b, i_b, SYNC: tl.constexpr):
    """Release: this program's stores of step ``k`` are visible before its counter increment."""
    if SYNC:
        tl.debug_barrier()
        tl.atomic_add(flags + k * n_b + i_b, 1, sem="release", scope="gpu")


@triton.jit
def resident_dots(b_x0, b_x1, b_x2, b_x3, b_w0, b_w1, b_w2, b_w3, NG: tl.constexpr, ACC: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """``X_g @ W_g`` for the ``NG`` gates from operands already on chip; absent gates are zeros."""
    b_z = tl.zeros([BLOCK_B, BLOCK_U], dtype=ACC)
    b_a0 = tl.dot(b_x0, b_w0, b_z, input_precision=PRECISION)
    b_a1, b_a2, b_a3 = b_z, b_z, b_z
    if NG > 1:
        b_a1 = tl.dot(b_x1, b_w1, b_z, input_precision=PRECISION)
        b_a2 = tl.dot(b_x2, b_w2, b_z, input_precision=PRECISION)
    if NG > 3:
        b_a3 = tl.dot(b_x3, b_w3, b_z, input_precision=PRECISION)
    return b_a0, b_a1, b_a2, b_a3


@triton.jit
def slice_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's batch group ``i_b``, the grid's ``(n_u, n_b)``, its rows and units (offsets,
    masks, :func:`~.utils.tile`) and the full hidden range ``o_k`` of ``h`` with masks."""
    i_u, i_b = tl.program_id(0), tl.program_id(1)
    o_b, o_u, m_b, m_u, m_bu = tile(i_b, i_u, BLOCK_B, BLOCK_U, B, H)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < H
    return i_b, tl.num_programs(0), tl.num_programs(1), o_b, o_u, m_b, m_u, m_bu, o_k, m_k, m_b[:, None] & m_k[None, :]


@triton.jit(do_not_specialize=["T", "B", "k_begin", "k_end"])
def rnn_fwd_persistent_kernel(
    gx, w_hh, b_hh, bs, hs, cs, g, flags,
    T, B, H, k_begin, k_end,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BS: tl.constexpr, SAVE: tl.constexpr,
    SYNC: tl.constexpr, W_RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KS: tl.constexpr,
):
    """Forward steps ``k_begin <= k < k_end`` (in time order) of units ``U`` for rows ``R``."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    i_b, n_u, n_b, o_b, o_u, m_b, m_u, m_bu, o_k, m_k, m_bk = slice_tile(B, H, BLOCK_B, BLOCK_U, BLOCK_K)
    GH = NG * H
    p_bu = o_b[:, None] * H + o_u[None, :]
    # W_g[U, :]^T as (BLOCK_K, BLOCK_U) tiles, loaded once
    p_w = w_hh + o_u[None, :].to(tl.int64) * H + o_k[:, None]
    m_w = m_k[:, None] & m_u[None, :]
    if W_RESIDENT:
        b_w0, b_w1, b_w2, b_w3 = load_gates(p_w, H * H, m_w, NG)
    b_b0 = tl.zeros([BLOCK_U], dtype=ACC)
    b_b1, b_b2, b_b3 = b_b0, b_b0, b_b0
    if HAS_BIAS:
        b_b0, b_b1, b_b2, b_b3 = load_gates(b_hh + o_u, H, m_u, NG)
    t_0 = T - 1 - k_begin if REVERSE else k_begin
    b_c = tl.zeros([BLOCK_B, BLOCK_U], dtype=ACC)
    if MODE == 0:
        b_c = tl.load(cs + (t_0 + 1 if REVERSE else t_0) * B * H + p_bu, mask=m_bu, other=0.).to(ACC)

    for k in range(k_begin, k_end):
        t = T - 1 - k if REVERSE else k
        i_prev = t + 1 if REVERSE else t
        i_new = t if REVERSE else t + 1
        step_wait(flags, k, n_b, i_b, n_u, SYNC)
        p_h = hs + i_prev * B * H
        if W_RESIDENT:
            b_h = tl.load(p_h + o_b[:, None] * H + o_k[None, :], mask=m_bk, other=0.)
            b_a0, b_a1, b_a2, b_a3 = resident_dots(b_h, b_h, b_h, b_h, b_w0, b_w1, b_w2, b_w3, NG, ACC, PRECISION,
                                                   BLOCK_B, BLOCK_U)
        else:
            b_a0, b_a1, b_a2, b_a3 = gate_dots(p_h, H, 0, o_b, m_b, w_hh, 1, H, H * H, o_u, m_u, H, NG, False,
                                               ACC, PRECISION, BLOCK_B, BLOCK_U, BLOCK_KS)
        b_g0, b_g1, b_g2, b_g3 = load_gates(gx + (t * B + o_b[:, None]) * GH + o_u[None, :], H, m_bu, NG)
        b_a0 += b_g0.to(ACC) + b_b0[None, :].to(ACC)
        b_a1 += b_g1.to(ACC) + b_b1[None, :].to(ACC)
        b_a2 += b_b2[None, :].to(ACC)
        b_a3 += b_g3.to(ACC) + b_b3[None, :].to(ACC)
        b_hp = tl.load(p_h + p_bu, mask=m_bu, other=0.)
        if MODE == 1:
            # n: input part into b_a2, hidden part (inside r * (...)) into b_a3
            b_a3 = b_a2
            b_a2 = b_g2.to(ACC)
        else:
            b_a2 += b_g2.to(ACC)
        b_y, b_cn, b_s0, b_s1, b_s2, b_s3 = cell_update(MODE, b_a0, b_a1, b_a2, b_a3, b_hp.to(ACC), b_c)

        m_act = active_rows(bs, t, o_b, m_b, HAS_BS)
        if SAVE:
            store_gates(g + (t * B + o_b[:, None]) * (NS * H) + o_u[None, :], H, m_bu, NS, b_s0, b_s1, b_s2, b_s3)
        if MODE == 0:
            b_c = tl.where(m_act, b_cn, b_c)
            tl.store(cs + i_new * B * H + p_bu, b_c, mask=m_bu)
        tl.store(hs + i_new * B * H + p_bu, tl.where(m_act, b_y.to(b_hp.dtype), b_hp), mask=m_bu)
        step_done(flags, k, n_b, i_b, SYNC)


@triton.jit(do_not_specialize=["T", "B", "k_begin", "k_end"])
def rnn_bwd_persistent_kernel(
    dout, g, hs, cs, w_hh, bs, dgi, dgh, dh, dc, flags,
    T, B, H, k_begin, k_end,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    REVERSE: tl.constexpr, HAS_BS: tl.constexpr, SYNC: tl.constexpr, W_RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KS: tl.constexpr,
):
    """Backward phases ``k_begin <= k < k_end`` of ``0 <= k <= T`` (``k``: steps in backward order).

    Phase ``k``: for ``k > 0``, ``dh`` of units ``U`` before step ``k - 1`` from all units' gate
    gradients of step ``k - 1`` (``dgh``); for ``k < T``, the gate gradients of step ``k``.
    ``dh`` and ``dc`` (``(B, H)``, accumulation dtype) carry the state across launches: at
    ``k_begin`` the total gradient of ``h`` at step ``k_begin - 1`` (``dh_n`` at 0) and ``dc``;
    at ``k_end = T + 1`` they hold ``dh0`` and ``dc0``. ``dout`` has inactive rows zeroed.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    i_b, n_u, n_b, o_b, o_u, m_b, m_u, m_bu, o_k, m_k, m_bk = slice_tile(B, H, BLOCK_B, BLOCK_U, BLOCK_K)
    GH = NG * H
    p_bu = o_b[:, None] * H + o_u[None, :]
    # columns U of W_g as (BLOCK_K, BLOCK_U) tiles, loaded once: dh_prev[R, U] = sum_g dG_g[R, :] W_g[:, U]
    p_w = w_hh + o_k[:, None].to(tl.int64) * H + o_u[None, :]
    m_w = m_k[:, None] & m_u[None, :]
    if W_RESIDENT:
        b_w0, b_w1, b_w2, b_w3 = load_gates(p_w, H * H, m_w, NG)
    b_dt = tl.load(dh + p_bu, mask=m_bu, other=0.).to(ACC)
    b_dc = tl.zeros([BLOCK_B, BLOCK_U], dtype=ACC)
    if MODE == 0:
        b_dc = tl.load(dc + p_bu, mask=m_bu, other=0.).to(ACC)

    for k in range(k_begin, k_end):
        b_dh = b_dt
        if k > 0:
            t = k - 1 if REVERSE else T - k
            step_wait(flags, k, n_b, i_b, n_u, SYNC)
            p_dg = dgh + t * B * GH
            if W_RESIDENT:
                b_x0, b_x1, b_x2, b_x3 = load_gates(p_dg + o_b[:, None] * GH + o_k[None, :], H, m_bk, NG)
                b_a0, b_a1, b_a2, b_a3 = resident_dots(b_x0, b_x1, b_x2, b_x3, b_w0, b_w1, b_w2, b_w3, NG, ACC,
                                                       PRECISION, BLOCK_B, BLOCK_U)
            else:
                b_a0, b_a1, b_a2, b_a3 = gate_dots(p_dg, GH, H, o_b, m_b, w_hh, H, 1, H * H, o_u, m_u, H, NG, True,
                                                   ACC, PRECISION, BLOCK_B, BLOCK_U, BLOCK_KS)
            b_acc = b_a0
            if NG > 1:
                b_acc += b_a1 + b_a2
            if NG > 3:
                b_acc += b_a3
            if MODE == 1:  # GRU: the direct term dh * z
                b_acc += b_dt * tl.load(g + (t * B + o_b[:, None]) * (NS * H) + H + o_u[None, :], mask=m_bu,
                                        other=0.)
            m_act = active_rows(bs, t, o_b, m_b, HAS_BS)
            b_dh = tl.where(m_act, b_acc, b_dt)
        if k < T:
            t = k if REVERSE else T - 1 - k
            i_prev = t + 1 if REVERSE else t
            i_new = t if REVERSE else t + 1
            b_dt = b_dh + tl.load(dout + t * B * H + p_bu, mask=m_bu, other=0.).to(ACC)
            m_act = active_rows(bs, t, o_b, m_b, HAS_BS)
            b_dm = tl.where(m_act, b_dt, 0.)
            b_d0, b_d1, b_d2, b_d3, _, b_dc = gate_grads(
                MODE, NS, ACC, b_dm, b_dc, m_act, g + (t * B + o_b[:, None]) * (NS * H) + o_u[None, :], H, m_bu,
                cs + i_new * B * H + p_bu if MODE == 0 else cs, cs + i_prev * B * H + p_bu if MODE == 0 else cs,
                hs + i_prev * B * H + p_bu)
            p_dg = (t * B + o_b[:, None]) * GH + o_u[None, :]
            store_gates(dgi + p_dg, H, m_bu, NG, b_d0, b_d1, b_d2, b_d3)
            if MODE == 1:
                store_gates(dgh + p_dg, H, m_bu, NG, b_d0, b_d1, b_d3, b_d3)
            step_done(flags, k, n_b, i_b, SYNC)
        else:
            b_dt = b_dh
    tl.store(dh + p_bu, b_dt, mask=m_bu)
    if MODE == 0:
        tl.store(dc + p_bu, b_dc, mask=m_bu)


class PersistentConfig(NamedTuple):
    """Launch configuration of a persistent kernel: tile sizes, warps, weight residency."""

    block_b: int
    block_u: int
    num_warps: int
    w_resident: bool
    block_ks: int = 32  # K tile of a streamed W_hh slice

    def grid(self, H: int, B: int) -> tuple[int, int]:
        """``(P_h, P_b)``: hidden slices and batch groups."""
        return triton.cdiv(H, self.block_u), triton.cdiv(B, self.block_b)


# programs that run concurrently on an H100/H200 (132 SMs, one program each)
MAX_PROGRAMS = 132
# widest hidden slice "auto" runs on the persistent kernels: 64- and 128-unit slices (batch 256
# at hidden 512 and 1024) spilled in the sm_90 compile gate, resident or streamed
MAX_AUTO_UNITS = 32
# registers per thread a resident W_hh slice may take (of 255): at 16-row tiles tl.dot compiles
# to mma.sync, and the compiler keeps the loop-invariant slice in registers across the time loop.
# From the sm_90 compile gate: 128 at 4 warps compiled without spills (bfloat16 H 256 x 32 units,
# H 512 x 16), 128 at 16 warps (cap 128) and 3xTF32 float32 slices (split in registers) spilled.
RESIDENT_REGS = {4: 128, 8: 64}


def persistent_config(mode: int, H: int, B: int, dtype: torch.dtype, precision: Optional[str] = None,
                      backward: bool = False) -> PersistentConfig:
    """Tile sizes for the persistent kernels (heuristic from the sm_90 compile gate; speed
    unmeasured on a GPU).

    Row groups of 16 (``tl.dot``'s minimum; 32 spilled); hidden slices as narrow as 16 units
    so that small batches still spread over many SMs, widened until the grid fits
    :data:`MAX_PROGRAMS`. The ``W_hh`` slice stays resident while its registers per thread
    fit :data:`RESIDENT_REGS` at 4 or 8 warps (a 3xTF32 float32 slice counts four times);
    otherwise it is streamed from L2 every step at 8 warps (4 spilled), in K tiles of 32, of 16
    for slices of 64 units or more and in backward (32 spilled with 3xTF32). :func:`~.rnn.choose_kernel` takes slices of at most
    :data:`MAX_AUTO_UNITS` (wider ones spilled in the compile gate). ``precision``: the ``tl.dot``
    precision, by default :func:`~.utils.dot_precision` now. The backward holds more state per
    step: it runs a resident slice at 8 warps only (4 spilled at bfloat16 H 256).
    """
    block_b = 16
    p_b = triton.cdiv(B, block_b)
    block_u = 16
    while triton.cdiv(H, block_u) * p_b > MAX_PROGRAMS and block_u < dot_block(H):
        block_u *= 2
    words = NUM_GATES[mode] * dot_block(H) * block_u * dtype.itemsize / 4
    if (precision or dot_precision(dtype)) == "tf32x3":
        words *= 4
    for num_warps, regs in RESIDENT_REGS.items():
        if words / (32 * num_warps) <= regs and (num_warps > 4 or not backward):
            return PersistentConfig(block_b, block_u, num_warps, True)
    return PersistentConfig(block_b, block_u, 8, False, 16 if block_u >= 64 or backward else 32)


def _run(kernel, cfg: PersistentConfig, T: int, B: int, H: int, n_phases: int, args: tuple, consts: dict,
         sync: Optional[bool]) -> None:
    """Launch ``kernel`` over phases ``0 <= k < n_phases``: once (``SYNC``, cooperatively on a
    GPU) or once per phase. ``sync=None``: once on a GPU, and under the interpreter only
    when ``P_h == 1`` (no program then waits on another)."""
    grid = cfg.grid(H, B)
    if sync is None:
        sync = not is_interpreting() or grid[0] == 1
    # one counter per (phase, batch group): a poll for "phase k - 1 done" never sees a later value
    flags = torch.zeros(n_phases * grid[1], dtype=torch.int32, device=args[0].device)
    meta = dict(BLOCK_B=cfg.block_b, BLOCK_U=cfg.block_u, BLOCK_K=dot_block(H), BLOCK_KS=cfg.block_ks,
                W_RESIDENT=cfg.w_resident, num_warps=cfg.num_warps, num_stages=1)
    if not is_interpreting():
        meta["launch_cooperative_grid"] = True
    for k_begin, k_end in ([(0, n_phases)] if sync else [(k, k + 1) for k in range(n_phases)]):
        kernel[grid](*args, flags, T, B, H, k_begin, k_end, SYNC=sync, **meta, **consts)


def persistent_fwd(mode: int, gx: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                   batch_sizes: Optional[Tensor], reverse: bool, save: bool, cfg: Optional[PersistentConfig] = None,
                   sync: Optional[bool] = None) -> FwdState:
    """A layer's forward on the persistent kernel; same inputs and result as
    :func:`~.sequence.sequence_fwd` without projection. ``cfg`` overrides
    :func:`persistent_config`; ``sync`` forces one launch (``True``) or one per step
    (``False``); default: one on a GPU or when ``P_h == 1``."""
    T, B, _ = gx.shape
    H = w_hh.size(1)
    st = alloc_fwd(mode, gx, h0, c0, H, False, reverse, save)
    bs = None if batch_sizes is None else batch_sizes.to(device=gx.device, dtype=torch.int32)
    cfg = cfg or persistent_config(mode, H, B, gx.dtype)
    consts = dict(MODE=mode, NG=NUM_GATES[mode], NS=NUM_SAVED[mode], IS_FP64=gx.dtype == torch.float64,
                  PRECISION=dot_precision(gx.dtype), REVERSE=reverse, HAS_BIAS=b_hh is not None,
                  HAS_BS=bs is not None, SAVE=save)
    _run(rnn_fwd_persistent_kernel, cfg, T, B, H, T, (gx, w_hh, b_hh, bs, st.hs, st.cs, st.gs), consts, sync)
    return st


def persistent_bwd(mode: int, dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], st: FwdState, w_hh: Tensor,
                   batch_sizes: Optional[Tensor], reverse: bool, cfg: Optional[PersistentConfig] = None,
                   sync: Optional[bool] = None):
    """Backward through time on the persistent kernel; same inputs and result as
    :func:`~.sequence.sequence_bwd` without projection (``dhs`` is ``None``); ``cfg`` and
    ``sync`` as for :func:`persistent_fwd`."""
    T, B, H = dout.shape
    acc = acc_dtype(dout.dtype)
    dgi = dout.new_empty(T, B, NUM_GATES[mode] * H)
    dgh = torch.empty_like(dgi) if mode == GRU else dgi
    # the kernel's state in and out (dh_n, dc_n in; dh0, dc0 out): fresh copies
    dh = dh_n.to(acc, copy=True).contiguous()
    dc = None if st.cs is None else dc_n.to(acc, copy=True).contiguous()
    bs = None if batch_sizes is None else batch_sizes.to(device=dout.device, dtype=torch.int32)
    cfg = cfg or persistent_config(mode, H, B, dout.dtype, backward=True)
    consts = dict(MODE=mode, NG=NUM_GATES[mode], NS=NUM_SAVED[mode], IS_FP64=dout.dtype == torch.float64,
                  PRECISION=dot_precision(dout.dtype), REVERSE=reverse, HAS_BS=bs is not None)
    _run(rnn_bwd_persistent_kernel, cfg, T, B, H, T + 1, (dout, st.gs, st.hs, st.cs, w_hh, bs, dgi, dgh, dh, dc),
         consts, sync)
    return dgi, dgh, None, dh, dc
