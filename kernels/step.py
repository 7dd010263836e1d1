"""Step kernels: one launch per time step (per direction and layer).

Forward: ``h_{t-1} W_hh^T`` with ``tl.dot`` plus the precomputed input
projection and bias, fused gate update, new state and the gates backward
needs; with ``proj_size`` a second launch projects ``m_t`` by ``W_hr``.
Backward: pointwise gate gradients (and ``dh W_hr`` with projection), then
``dh_{t-1}`` with ``tl.dot``; weight gradients are GEMMs over all steps
afterwards (see :mod:`rnnfast.kernels.rnn`).

Rows at or past ``n_active`` (packed sequences that have ended) keep their
state and get no gradient through the step.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (
    NUM_GATES,
    NUM_SAVED,
    PreboundLaunch,
    acc_dtype,
    aligned_by_time,
    cell_update,
    dot_precision,
    gate_dots,
    gate_grads,
    load_gates,
    prune_by_batch,
    quick_bench,
    step_configs,
    store_gates,
    tile,
)


@triton.autotune(configs=step_configs(), key=["B", "H", "K"], do_bench=quick_bench,
                 prune_configs_by={"early_config_prune": prune_by_batch})
@triton.heuristics({
    "HAS_BIAS": lambda a: a["b_hh"] is not None,
    "HAS_PROJ": lambda a: a["m"] is not None,
    "SAVE": lambda a: a["g"] is not None,
})
@triton.jit(do_not_specialize=["n_active", "B"])
def rnn_fwd_step_kernel(
    gx, h, c, w_hh, b_hh, h_new, c_new, m, g,
    n_active, B, H, K,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step on a (rows, hidden units) tile; ``K`` is the size of ``h``."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    o_b, o_h, m_b, m_h, m_bh = tile(tl.program_id(0), tl.program_id(1), BLOCK_B, BLOCK_H, B, H)
    b_a0, b_a1, b_a2, b_a3 = gate_dots(h, K, 0, o_b, m_b, w_hh, 1, K, H * K, o_h, m_h, K, NG, False, ACC, PRECISION,
                                       BLOCK_B, BLOCK_H, BLOCK_K)
    if HAS_BIAS:
        b_b0, b_b1, b_b2, b_b3 = load_gates(b_hh + o_h, H, m_h, NG)
        b_a0 += b_b0.to(ACC)[None, :]
        b_a1 += b_b1.to(ACC)[None, :]
        b_a2 += b_b2.to(ACC)[None, :]
        b_a3 += b_b3.to(ACC)[None, :]
    b_g0, b_g1, b_g2, b_g3 = load_gates(gx + o_b[:, None] * (NG * H) + o_h[None, :], H, m_bh, NG)
    b_a0 += b_g0.to(ACC)
    b_a1 += b_g1.to(ACC)
    b_a3 += b_g3.to(ACC)
    if MODE == 1:
        # n: input part into b_a2, hidden part (inside r * (...)) into b_a3
        b_a3 = b_a2
        b_a2 = b_g2.to(ACC)
    else:
        b_a2 += b_g2.to(ACC)

    if HAS_PROJ:
        b_hp = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    else:
        b_hp = tl.load(h + o_b[:, None] * K + o_h[None, :], mask=m_bh, other=0.).to(ACC)
    if MODE == 0:
        b_cp = tl.load(c + o_b[:, None] * H + o_h[None, :], mask=m_bh, other=0.).to(ACC)
    else:
        b_cp = b_hp
    b_y, b_c, b_s0, b_s1, b_s2, b_s3 = cell_update(MODE, b_a0, b_a1, b_a2, b_a3, b_hp, b_cp)

    m_act = (o_b < n_active)[:, None]
    if MODE == 0:
        tl.store(c_new + o_b[:, None] * H + o_h[None, :], tl.where(m_act, b_c, b_cp), mask=m_bh)
    if HAS_PROJ:
        tl.store(m + o_b[:, None] * H + o_h[None, :], b_y.to(m.dtype.element_ty), mask=m_bh)
    else:
        tl.store(h_new + o_b[:, None] * K + o_h[None, :], tl.where(m_act, b_y, b_hp).to(h_new.dtype.element_ty),
                 mask=m_bh)
    if SAVE:
        store_gates(g + o_b[:, None] * (NS * H) + o_h[None, :], H, m_bh, NS, b_s0, b_s1, b_s2, b_s3)


@triton.autotune(configs=step_configs(), key=["B", "H", "K"], do_bench=quick_bench,
                 prune_configs_by={"early_config_prune": prune_by_batch})
@triton.jit(do_not_specialize=["n_active", "B"])
def rnn_fwd_proj_kernel(
    m, w_hr, h, h_new,
    n_active, B, H, K,
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``h_new = m W_hr^T`` on active rows, ``h`` elsewhere (``H``: projection size, ``K``: hidden size)."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    o_b, o_h, m_b, m_h, m_bh = tile(tl.program_id(0), tl.program_id(1), BLOCK_B, BLOCK_H, B, H)
    b_acc, _, _, _ = gate_dots(m, K, 0, o_b, m_b, w_hr, 1, K, 0, o_h, m_h, K, 1, False, ACC, PRECISION,
                               BLOCK_B, BLOCK_H, BLOCK_K)
    p_h = o_b[:, None] * H + o_h[None, :]
    b_hp = tl.load(h + p_h, mask=m_bh, other=0.)
    b_y = tl.where((o_b < n_active)[:, None], b_acc.to(h_new.dtype.element_ty), b_hp)
    tl.store(h_new + p_h, b_y, mask=m_bh)


@triton.autotune(configs=step_configs(), key=["B", "H", "K"], do_bench=quick_bench,
                 prune_configs_by={"early_config_prune": prune_by_batch})
@triton.heuristics({"HAS_PROJ": lambda a: a["w_hr"] is not None})
@triton.jit(do_not_specialize=["n_active", "B"])
def rnn_bwd_step_kernel(
    dh, g, c, c_prev, h_prev, w_hr, dc, dc_prev, dgi, dgh,
    n_active, B, H, K,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gate gradients of one step from ``dh`` (the total gradient of ``h_t``, size ``K``)
    and, for LSTM, ``dc``; writes ``dc_prev`` and the pre-activation gradients of the
    input (``dgi``) and hidden (``dgh``, GRU only) projections."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    o_b, o_h, m_b, m_h, m_bh = tile(tl.program_id(0), tl.program_id(1), BLOCK_B, BLOCK_H, B, H)
    m_act = (o_b < n_active)[:, None]

    if HAS_PROJ:
        b_dm, _, _, _ = gate_dots(dh, K, 0, o_b, m_b, w_hr, H, 1, 0, o_h, m_h, K, 1, False, ACC, PRECISION,
                                  BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        b_dm = tl.load(dh + o_b[:, None] * K + o_h[None, :], mask=m_bh, other=0.).to(ACC)
    b_dm = tl.where(m_act, b_dm, 0.)

    p_s = o_b[:, None] * H + o_h[None, :]
    b_dc = tl.load(dc + p_s, mask=m_bh, other=0.) if MODE == 0 else b_dm
    b_d0, b_d1, b_d2, b_d3, _, b_dc = gate_grads(
        MODE, NS, ACC, b_dm, b_dc, m_act, g + o_b[:, None] * (NS * H) + o_h[None, :], H, m_bh,
        c + p_s if MODE == 0 else c, c_prev + p_s if MODE == 0 else c_prev, h_prev + p_s if MODE == 1 else h_prev)
    if MODE == 0:
        tl.store(dc_prev + p_s, b_dc, mask=m_bh)
    p_dg = o_b[:, None] * (NG * H) + o_h[None, :]
    store_gates(dgi + p_dg, H, m_bh, NG, b_d0, b_d1, b_d2, b_d3)
    if MODE == 1:
        store_gates(dgh + p_dg, H, m_bh, NG, b_d0, b_d1, b_d3, b_d3)


@triton.autotune(configs=step_configs(), key=["B", "H", "K"], do_bench=quick_bench,
                 prune_configs_by={"early_config_prune": prune_by_batch})
@triton.heuristics({"HAS_DOUT": lambda a: a["dout"] is not None})
@triton.jit(do_not_specialize=["n_active", "B"])
def rnn_bwd_dh_kernel(
    dgh, w_hh, g, dh, dout, dh_prev,
    n_active, B, H, K,
    MODE: tl.constexpr, NG: tl.constexpr, NS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dh_prev = dgh W_hh`` (+ GRU's ``dh * z``) on active rows, ``dh`` elsewhere,
    plus the output gradient of the previous step. Tiles run over ``h``'s ``K``
    columns; the reduction over the ``NG * H`` gate columns."""
    ACC = tl.float64 if IS_FP64 else tl.float32
    o_b, o_j, m_b, m_j, m_bj = tile(tl.program_id(0), tl.program_id(1), BLOCK_B, BLOCK_H, B, K)
    GH = NG * H
    b_acc, _, _, _ = gate_dots(dgh, GH, 0, o_b, m_b, w_hh, K, 1, 0, o_j, m_j, GH, 1, False, ACC, PRECISION,
                               BLOCK_B, BLOCK_H, BLOCK_K)
    p_j = o_b[:, None] * K + o_j[None, :]
    b_dh = tl.load(dh + p_j, mask=m_bj, other=0.).to(ACC)
    if MODE == 1:
        b_acc += b_dh * tl.load(g + o_b[:, None] * (NS * H) + H + o_j[None, :], mask=m_bj, other=0.)
    b_acc = tl.where((o_b < n_active)[:, None], b_acc, b_dh)
    if HAS_DOUT:
        b_acc += tl.load(dout + p_j, mask=m_bj, other=0.).to(ACC)
    tl.store(dh_prev + p_j, b_acc.to(dh_prev.dtype.element_ty), mask=m_bj)


class FwdState(NamedTuple):
    """What a layer's forward leaves: states by time and what backward needs.

    ``hs``/``cs`` are ``(T + 1, B, .)``: for a forward direction ``hs[t + 1]``
    is the state after time ``t`` and ``hs[0]`` the initial one; for the
    reverse direction ``hs[t]`` is the state after time ``t`` and ``hs[T]``
    the initial one. ``ms`` (projection only) is ``o * tanh(c)`` by time,
    ``gs`` the saved gates by time (``None`` when no gradient is needed).
    """

    hs: Tensor
    cs: Optional[Tensor]
    ms: Optional[Tensor]
    gs: Optional[Tensor]


def state_index(t: int, reverse: bool) -> tuple[int, int]:
    """Indices into ``hs``/``cs`` of the states before and after time ``t``."""
    return (t + 1, t) if reverse else (t, t + 1)


def alloc_fwd(mode: int, gx: Tensor, h0: Tensor, c0: Optional[Tensor], hidden: int, proj: bool, reverse: bool,
              save: bool) -> FwdState:
    """Allocate a layer's forward buffers and write the initial states."""
    T, B, _ = gx.shape
    hs = gx.new_empty(T + 1, B, h0.size(-1))
    hs[T if reverse else 0] = h0
    cs = None
    if c0 is not None:
        cs = gx.new_empty(T + 1, B, hidden, dtype=acc_dtype(gx.dtype))
        cs[T if reverse else 0] = c0
    ms = gx.new_empty(T, B, hidden) if proj else None
    gs = gx.new_empty(T, B, NUM_SAVED[mode] * hidden, dtype=acc_dtype(gx.dtype)) if save else None
    return FwdState(hs, cs, ms, gs)


def step_fwd(mode: int, gx: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
             w_hr: Optional[Tensor], batch_sizes: Optional[list[int]], reverse: bool, save: bool) -> FwdState:
    """A layer's forward with one step-kernel launch (two with projection) per time step.

    ``gx`` is the input projection ``x W_ih^T + b_ih``, ``(T, B, G * H)``.
    """
    T, B, GH = gx.shape
    H, K = w_hh.size(0) // NUM_GATES[mode], w_hh.size(1)
    st = alloc_fwd(mode, gx, h0, c0, H, w_hr is not None, reverse, save)
    consts = dict(MODE=mode, NG=NUM_GATES[mode], NS=NUM_SAVED[mode], IS_FP64=gx.dtype == torch.float64,
                  PRECISION=dot_precision(gx.dtype))
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    grid_p = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(K, meta["BLOCK_H"]))  # noqa: E731
    # per-time views made once (one unbind per buffer) rather than indexed in the loop: the
    # loop is launch-bound, and every Python-side tensor op adds to each step's overhead
    gxs, hs = gx.unbind(0), st.hs.unbind(0)
    cs = (None,) * (T + 1) if st.cs is None else st.cs.unbind(0)
    ms = (None,) * T if st.ms is None else st.ms.unbind(0)
    gs = (None,) * T if st.gs is None else st.gs.unbind(0)
    ns = [B] * T if batch_sizes is None else batch_sizes
    bind = aligned_by_time(gx, *st)
    fwd_kernel = PreboundLaunch(rnn_fwd_step_kernel, grid, consts, bind)
    proj_kernel = PreboundLaunch(rnn_fwd_proj_kernel, grid_p,
                                 dict(IS_FP64=consts["IS_FP64"], PRECISION=consts["PRECISION"]), bind)
    for s in range(T):
        t = T - 1 - s if reverse else s
        i_prev, i_new = (t + 1, t) if reverse else (t, t + 1)
        n = ns[t]
        fwd_kernel(gxs[t], hs[i_prev], cs[i_prev], w_hh, b_hh, hs[i_new], cs[i_new], ms[t], gs[t], n, B, H, K)
        if w_hr is not None:
            proj_kernel(ms[t], w_hr, hs[i_prev], hs[i_new], n, B, K, H)
    return st


def step_bwd(mode: int, dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], st: FwdState, w_hh: Tensor,
             w_hr: Optional[Tensor], batch_sizes: Optional[list[int]], reverse: bool):
    """A layer's backward through time with two step-kernel launches per step.

    ``dout`` is the output gradient with inactive (padded) rows zeroed. Returns
    ``(dgi, dgh, dhs, dh0, dc0)``: pre-activation gradients of the input and
    hidden projections by time (``dgh is dgi`` except for GRU), the total
    gradient of every output state by time, and the initial states' gradients.
    """
    T, B, K = dout.shape
    H = w_hh.size(0) // NUM_GATES[mode]
    GH = NUM_GATES[mode] * H
    acc = acc_dtype(dout.dtype)
    dgi = dout.new_empty(T, B, GH)
    dgh = dout.new_empty(T, B, GH) if mode == 1 else dgi
    dhs = dout.new_empty(T, B, K, dtype=acc)
    dh0 = dout.new_empty(B, K, dtype=acc)
    dc, dc_prev = None, None
    if st.cs is not None:
        dc = dc_n.to(acc).contiguous()
        dc_prev = torch.empty_like(dc)
    consts = dict(MODE=mode, NG=NUM_GATES[mode], NS=NUM_SAVED[mode], IS_FP64=dout.dtype == torch.float64,
                  PRECISION=dot_precision(dout.dtype))
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    grid_k = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(K, meta["BLOCK_H"]))  # noqa: E731
    times = list(range(T)) if reverse else list(range(T - 1, -1, -1))  # backward order
    dhs[times[0]] = dh_n + dout[times[0]]
    # per-time views made once (see step_fwd)
    dhs_t, gs, hs, dgis, dghs, douts = (a.unbind(0) for a in (dhs, st.gs, st.hs, dgi, dgh, dout))
    cs = (None,) * (T + 1) if st.cs is None else st.cs.unbind(0)
    ns = [B] * T if batch_sizes is None else batch_sizes
    bind = aligned_by_time(dhs, st.gs, st.cs, st.hs, dgi, dgh, dout)
    bwd_kernel = PreboundLaunch(rnn_bwd_step_kernel, grid, consts, bind)
    dh_kernel = PreboundLaunch(rnn_bwd_dh_kernel, grid_k, consts, bind)
    for k, t in enumerate(times):
        i_prev, i_new = (t + 1, t) if reverse else (t, t + 1)
        n = ns[t]
        bwd_kernel(dhs_t[t], gs[t], cs[i_new], cs[i_prev], hs[i_prev], w_hr, dc, dc_prev, dgis[t], dghs[t],
                   n, B, H, K)
        if k + 1 < T:
            dh_kernel(dghs[t], w_hh, gs[t], dhs_t[t], douts[times[k + 1]], dhs_t[times[k + 1]], n, B, H, K)
        else:  # the last step has no output gradient to add (another specialisation): launched plainly
            rnn_bwd_dh_kernel[grid_k](dghs[t], w_hh, gs[t], dhs_t[t], None, dh0, n, B, H, K, **consts)
        dc, dc_prev = dc_prev, dc
    return dgi, dgh, dhs, dh0, dc
