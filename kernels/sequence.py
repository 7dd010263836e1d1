"""Sequence kernels: one launch runs a whole layer direction's forward (or backward).

The grid runs over row tiles; each program owns its rows' full hidden state
(held on chip across ``for t in range(T)``) and streams ``W_hh`` (and
``W_hr``) from L2 every step, so programs never wait on one another. It
reads and writes the same buffers as the step kernels, so the two mix freely.
"""

from __future__ import annotations

from typing import Optional

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
    gate_grads,
    load_gates,
    prune_by_batch,
    quick_bench,
    sequence_configs,
    store_gates,
    tile,
)


@triton.autotune(configs=sequence_configs(), key=["B", "H", "K"], do_bench=quick_bench,
                 prune_configs_by={"early_config_prune": prune_by_batch})
@triton.heuristics({
    "HAS_BIAS": lambda a: a["b_hh"] is not None,
    "HAS_PROJ": lambda a: a["w_hr"] is not None,
    "HAS_BS": lambda a: a["bs"] is not None,
    "SAVE": lambda a: a["g"] is not None,
    "BLOCK_H": lambda a: dot_block(a["H"]),
    "BLOCK_K": lambda a: dot_block(a["K"]),
})
@triton.jit(do_not_specialize=["T", "B"])
def rnn_fwd_sequence_kernel(
    gx, w_hh, b_hh, w_hr, bs, hs, cs, ms, g,
    T, B, H, K,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_BS: tl.constexpr,
    SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All ``T`` steps for one row tile; ``K`` is the size of ``h`` (``BLOCK_H >= H``, ``BLOCK_K >= K``)."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    o_b, o_h, m_b, m_h, m_bh = tile(tl.program_id(0), 0, BLOCK_B, BLOCK_H, B, H)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    m_bk = m_b[:, None] & m_k[None, :]
    GH = NG * H

    i_0 = T if REVERSE else 0
    b_h = tl.load(hs + (i_0 * B + o_b[:, None]) * K + o_k[None, :], mask=m_bk, other=0.)
    if MODE == 0:
        b_c = tl.load(cs + (i_0 * B + o_b[:, None]) * H + o_h[None, :], mask=m_bh, other=0.).to(ACC)
    else:
        b_c = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    p_w = w_hh + o_h[None, :].to(tl.int64) * K + o_k[:, None]
    m_w = m_k[:, None] & m_h[None, :]
    b_b0 = tl.zeros([BLOCK_H], dtype=ACC)
    b_b1, b_b2, b_b3 = b_b0, b_b0, b_b0
    if HAS_BIAS:
        b_b0, b_b1, b_b2, b_b3 = load_gates(b_hh + o_h, H, m_h, NG)
        b_b0, b_b1, b_b2, b_b3 = b_b0.to(ACC), b_b1.to(ACC), b_b2.to(ACC), b_b3.to(ACC)

    for s in range(T):
        t = T - 1 - s if REVERSE else s
        i_new = t if REVERSE else t + 1
        b_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        b_a0 = tl.dot(b_h, tl.load(p_w, mask=m_w, other=0.), b_z, input_precision=PRECISION) + b_b0[None, :]
        p_gx = gx + (t * B + o_b[:, None]) * GH + o_h[None, :]
        b_a0 += tl.load(p_gx, mask=m_bh, other=0.).to(ACC)
        b_a1, b_a2, b_a3 = b_z, b_z, b_z
        if NG > 1:
            b_a1 = tl.dot(b_h, tl.load(p_w + H * K, mask=m_w, other=0.), b_z, input_precision=PRECISION)
            b_a1 += b_b1[None, :] + tl.load(p_gx + H, mask=m_bh, other=0.).to(ACC)
            b_a2 = tl.dot(b_h, tl.load(p_w + 2 * H * K, mask=m_w, other=0.), b_z, input_precision=PRECISION)
            b_a2 += b_b2[None, :]
        if MODE == 0:
            b_a2 += tl.load(p_gx + 2 * H, mask=m_bh, other=0.).to(ACC)
            b_a3 = tl.dot(b_h, tl.load(p_w + 3 * H * K, mask=m_w, other=0.), b_z, input_precision=PRECISION)
            b_a3 += b_b3[None, :] + tl.load(p_gx + 3 * H, mask=m_bh, other=0.).to(ACC)
        if MODE == 1:
            # n: input part into b_a2, hidden part (inside r * (...)) into b_a3
            b_a3 = b_a2
            b_a2 = tl.load(p_gx + 2 * H, mask=m_bh, other=0.).to(ACC)
            b_hp = b_h.to(ACC)
        else:
            b_hp = b_c
        b_y, b_cn, b_s0, b_s1, b_s2, b_s3 = cell_update(MODE, b_a0, b_a1, b_a2, b_a3, b_hp, b_c)

        m_act = active_rows(bs, t, o_b, m_b, HAS_BS)
        if SAVE:
            store_gates(g + (t * B + o_b[:, None]) * (NS * H) + o_h[None, :], H, m_bh, NS, b_s0, b_s1, b_s2, b_s3)
        if MODE == 0:
            b_c = tl.where(m_act, b_cn, b_c)
            tl.store(cs + (i_new * B + o_b[:, None]) * H + o_h[None, :], b_c, mask=m_bh)
        if HAS_PROJ:
            b_m = b_y.to(ms.dtype.element_ty)
            tl.store(ms + (t * B + o_b[:, None]) * H + o_h[None, :], b_m, mask=m_bh)
            b_wr = tl.load(w_hr + o_k[None, :].to(tl.int64) * H + o_h[:, None], mask=m_k[None, :] & m_h[:, None],
                           other=0.)
            b_y = tl.dot(b_m, b_wr, tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC), input_precision=PRECISION)
        b_h = tl.where(m_act, b_y.to(b_h.dtype), b_h)
        tl.store(hs + (i_new * B + o_b[:, None]) * K + o_k[None, :], b_h, mask=m_bk)



@triton.autotune(configs=sequence_configs(), key=["B", "H", "K"], do_bench=quick_bench,
                 prune_configs_by={"early_config_prune": prune_by_batch})
@triton.heuristics({
    "HAS_PROJ": lambda a: a["w_hr"] is not None,
    "HAS_BS": lambda a: a["bs"] is not None,
    "BLOCK_H": lambda a: dot_block(a["H"]),
    "BLOCK_K": lambda a: dot_block(a["K"]),
})
@triton.jit(do_not_specialize=["T", "B"])
def rnn_bwd_sequence_kernel(
    dout, dh_n, dc_n, g, hs, cs, w_hh, w_hr, bs, dgi, dgh, dhs, dh0, dc0,
    T, B, H, K,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    REVERSE: tl.constexpr, HAS_PROJ: tl.constexpr, HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward through all ``T`` steps for one row tile, ``dh``/``dc`` held on chip.

    ``dout`` has inactive rows zeroed; writes the pre-activation gradients
    ``dgi``/``dgh`` by time, ``dhs`` (projection only) and the initial states' gradients.
    """
    ACC = tl.float64 if IS_FP64 else tl.float32
    o_b, o_h, m_b, m_h, m_bh = tile(tl.program_id(0), 0, BLOCK_B, BLOCK_H, B, H)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    m_bk = m_b[:, None] & m_k[None, :]
    m_w = m_h[:, None] & m_k[None, :]
    GH = NG * H
    p_bh = o_b[:, None] * H + o_h[None, :]
    p_bk = o_b[:, None] * K + o_k[None, :]
    # W_hh gate tiles as (BLOCK_H, BLOCK_K): dh_prev = sum_g dgate_g W_hh_g
    p_w = w_hh + o_h[:, None].to(tl.int64) * K + o_k[None, :]

    b_dh = tl.load(dh_n + p_bk, mask=m_bk, other=0.).to(ACC)
    if MODE == 0:
        b_dc = tl.load(dc_n + p_bh, mask=m_bh, other=0.).to(ACC)
    else:
        b_dc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for s in range(T):
        t = s if REVERSE else T - 1 - s
        i_prev = t + 1 if REVERSE else t
        i_new = t if REVERSE else t + 1
        b_dh += tl.load(dout + t * B * K + p_bk, mask=m_bk, other=0.).to(ACC)
        m_act = active_rows(bs, t, o_b, m_b, HAS_BS)
        if HAS_PROJ:
            tl.store(dhs + t * B * K + p_bk, b_dh, mask=m_bk)
            b_wr = tl.load(w_hr + o_k[:, None].to(tl.int64) * H + o_h[None, :], mask=m_k[:, None] & m_h[None, :],
                           other=0.)
            b_dm = tl.dot(b_dh.to(b_wr.dtype), b_wr, tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC),
                          input_precision=PRECISION)
        else:
            b_dm = b_dh
        b_dm = tl.where(m_act, b_dm, 0.)

        b_d0, b_d1, b_d2, b_d3, b_x, b_dc = gate_grads(
            MODE, NS, ACC, b_dm, b_dc, m_act, g + (t * B + o_b[:, None]) * (NS * H) + o_h[None, :], H, m_bh,
            cs + i_new * B * H + p_bh if MODE == 0 else cs, cs + i_prev * B * H + p_bh if MODE == 0 else cs,
            hs + i_prev * B * K + p_bh)

        T_DG = dgi.dtype.element_ty
        p_dg = (t * B + o_b[:, None]) * GH + o_h[None, :]
        b_d0 = b_d0.to(T_DG)
        tl.store(dgi + p_dg, b_d0, mask=m_bh)
        b_acc = tl.dot(b_d0, tl.load(p_w, mask=m_w, other=0.), tl.zeros([BLOCK_B, BLOCK_K], dtype=ACC),
                       input_precision=PRECISION)
        if NG > 1:
            b_d1 = b_d1.to(T_DG)
            b_d2 = b_d2.to(T_DG)
            tl.store(dgi + p_dg + H, b_d1, mask=m_bh)
            tl.store(dgi + p_dg + 2 * H, b_d2, mask=m_bh)
            b_acc = tl.dot(b_d1, tl.load(p_w + H * K, mask=m_w, other=0.), b_acc, input_precision=PRECISION)
        if MODE == 0:
            b_d3 = b_d3.to(T_DG)
            tl.store(dgi + p_dg + 3 * H, b_d3, mask=m_bh)
            b_acc = tl.dot(b_d2, tl.load(p_w + 2 * H * K, mask=m_w, other=0.), b_acc, input_precision=PRECISION)
            b_acc = tl.dot(b_d3, tl.load(p_w + 3 * H * K, mask=m_w, other=0.), b_acc, input_precision=PRECISION)
        if MODE == 1:
            b_d3 = b_d3.to(T_DG)
            tl.store(dgh + p_dg, b_d0, mask=m_bh)
            tl.store(dgh + p_dg + H, b_d1, mask=m_bh)
            tl.store(dgh + p_dg + 2 * H, b_d3, mask=m_bh)
            b_acc = tl.dot(b_d3, tl.load(p_w + 2 * H * K, mask=m_w, other=0.), b_acc, input_precision=PRECISION)
            b_acc += b_x
        b_dh = tl.where(m_act, b_acc, b_dh)
    tl.store(dh0 + p_bk, b_dh, mask=m_bk)
    if MODE == 0:
        tl.store(dc0 + p_bh, b_dc, mask=m_bh)


def sequence_fwd(mode: int, gx: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                 w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool, save: bool) -> FwdState:
    """A layer's forward in one launch; same inputs and result as :func:`~.step.step_fwd`
    (``batch_sizes`` a tensor here, moved to the device once)."""
    T, B, _ = gx.shape
    H, K = w_hh.size(0) // NUM_GATES[mode], w_hh.size(1)
    st = alloc_fwd(mode, gx, h0, c0, H, w_hr is not None, reverse, save)
    bs = None if batch_sizes is None else batch_sizes.to(device=gx.device, dtype=torch.int32)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)  # noqa: E731
    rnn_fwd_sequence_kernel[grid](
        gx, w_hh, b_hh, w_hr, bs, st.hs, st.cs, st.ms, st.gs, T, B, H, K,
        MODE=mode, NG=NUM_GATES[mode], NS=NUM_SAVED[mode], IS_FP64=gx.dtype == torch.float64,
        PRECISION=dot_precision(gx.dtype), REVERSE=reverse,
    )
    return st


def sequence_bwd(mode: int, dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], st: FwdState, w_hh: Tensor,
                 w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool):
    """Backward through time in one launch; same inputs and result as :func:`~.step.step_bwd`
    (``dhs`` is only written with projection, ``None`` otherwise)."""
    T, B, K = dout.shape
    H = w_hh.size(0) // NUM_GATES[mode]
    acc = acc_dtype(dout.dtype)
    dgi = dout.new_empty(T, B, NUM_GATES[mode] * H)
    dgh = torch.empty_like(dgi) if mode == GRU else dgi
    dhs = dout.new_empty(T, B, K, dtype=acc) if w_hr is not None else None
    dh0 = dout.new_empty(B, K, dtype=acc)
    dc0 = dout.new_empty(B, H, dtype=acc) if st.cs is not None else None
    bs = None if batch_sizes is None else batch_sizes.to(device=dout.device, dtype=torch.int32)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)  # noqa: E731
    rnn_bwd_sequence_kernel[grid](
        dout, dh_n.contiguous(), None if dc_n is None else dc_n.contiguous(), st.gs, st.hs, st.cs, w_hh, w_hr, bs,
        dgi, dgh, dhs, dh0, dc0, T, B, H, K,
        MODE=mode, NG=NUM_GATES[mode], NS=NUM_SAVED[mode], IS_FP64=dout.dtype == torch.float64,
        PRECISION=dot_precision(dout.dtype), REVERSE=reverse,
    )
    return dgi, dgh, dhs, dh0, dc0
