"""Host side of one layer direction: the input projection GEMM, the recurrent
kernels (persistent, sequence or step, chosen in :func:`choose_kernel`) and,
in backward, the weight-gradient GEMMs over all steps."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .persistent import MAX_AUTO_UNITS, MAX_PROGRAMS, persistent_bwd, persistent_config, persistent_fwd
from .sequence import sequence_bwd, sequence_fwd
from .step import FwdState, step_bwd, step_fwd
from .utils import MODE_ID, NUM_GATES, use_sequence_kernel

KERNELS = ("auto", "persistent", "sequence", "step")


def choose_kernel(kernel: str, mode: int, hidden_size: int, out_size: int, batch: int,
                  dtype: torch.dtype = torch.float32, backward: bool = False) -> str:
    """The kernel a layer direction runs: ``"persistent"``, ``"sequence"`` or ``"step"``.

    ``"auto"`` (heuristic, NOT yet measured on a GPU): the persistent kernel for every layer
    without projection whose grid fits the GPU at once (``P_h x P_b <= MAX_PROGRAMS``,
    :func:`~.persistent.persistent_config`) with hidden slices of at most ``MAX_AUTO_UNITS``
    (wider ones spilled in the sm_90 compile gate: batch 256 at hidden 512 and 1024); with
    projection (``out_size != hidden_size``), or a batch too large, the previous choice: the sequence kernel
    up to a padded size of 128 in 16-bit dtypes (measured 2026-11-26, see
    :func:`~.utils.sequence_max_hidden`), else the step kernels. A forced ``"persistent"``
    with projection raises ``ValueError`` (it has no projection).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    proj = out_size != hidden_size
    if kernel == "persistent" and proj:
        raise ValueError("the persistent kernel has no projection (proj_size): use 'sequence' or 'step'")
    if kernel != "auto":
        return kernel
    if not proj:
        cfg = persistent_config(mode, hidden_size, batch, dtype)
        p_h, p_b = cfg.grid(hidden_size, batch)
        if p_h * p_b <= MAX_PROGRAMS and cfg.block_u <= MAX_AUTO_UNITS:
            return "persistent"
    return "sequence" if use_sequence_kernel("auto", hidden_size, out_size, mode, dtype, backward) else "step"


class LayerGrads(NamedTuple):
    """Gradients of one layer direction's inputs (``None`` where there is no input)."""

    dx: Tensor
    dh0: Tensor
    dc0: Optional[Tensor]
    dw_ih: Tensor
    dw_hh: Tensor
    db_ih: Optional[Tensor]
    db_hh: Optional[Tensor]
    dw_hr: Optional[Tensor]


def active_mask(batch_sizes: Tensor, B: int, device: torch.device) -> Tensor:
    """``(T, B, 1)`` boolean mask of the rows active at each step."""
    return (torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)).unsqueeze(-1).to(device)


def rnn_fwd(
    mode: str,
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    reverse: bool,
    save: bool,
    kernel: str = "auto",
) -> FwdState:
    """Forward of one layer direction on time-major ``x`` ``(T, B, I)``.

    ``save`` keeps the gates for :func:`rnn_bwd`; ``kernel`` is ``"auto"`` or forces
    one (see :func:`choose_kernel`).
    """
    m = MODE_ID[mode]
    gx = F.linear(x, w_ih, b_ih).contiguous()
    w_hh, w_hr = w_hh.contiguous(), None if w_hr is None else w_hr.contiguous()
    which = choose_kernel(kernel, m, w_hh.size(0) // NUM_GATES[m], w_hh.size(1), x.size(1), gx.dtype)
    if which == "persistent":
        return persistent_fwd(m, gx, h0, c0, w_hh, b_hh, batch_sizes, reverse, save)
    if which == "sequence":
        return sequence_fwd(m, gx, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, save)
    bs = None if batch_sizes is None else batch_sizes.tolist()
    return step_fwd(m, gx, h0, c0, w_hh, b_hh, w_hr, bs, reverse, save)


def layer_outputs(st: FwdState, batch_sizes: Optional[Tensor], reverse: bool):
    """``(out, h_n, c_n)`` from a forward's state buffers (``c_n`` in the input dtype)."""
    out = st.hs[:-1] if reverse else st.hs[1:]
    if batch_sizes is not None:
        out = out * active_mask(batch_sizes, out.size(1), out.device)
    i_n = 0 if reverse else -1
    c_n = None if st.cs is None else st.cs[i_n].to(st.hs.dtype)
    return out, st.hs[i_n], c_n


def rnn_bwd(
    mode: str,
    dout: Tensor,
    dh_n: Tensor,
    dc_n: Optional[Tensor],
    x: Tensor,
    st: FwdState,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    has_bias: bool,
    batch_sizes: Optional[Tensor],
    reverse: bool,
    kernel: str = "auto",
) -> LayerGrads:
    """Backward of :func:`rnn_fwd` (called with ``save=True``) given the gradients of its
    outputs; ``kernel`` as there (chosen anew: every kernel reads every forward's buffers)."""
    m = MODE_ID[mode]
    T, B, _ = dout.shape
    mask = None if batch_sizes is None else active_mask(batch_sizes, B, dout.device)
    if mask is not None:
        dout = dout * mask
    w_hh, w_hr = w_hh.contiguous(), None if w_hr is None else w_hr.contiguous()
    which = choose_kernel(kernel, m, w_hh.size(0) // NUM_GATES[m], w_hh.size(1), B, dout.dtype, backward=True)
    if which == "persistent":
        dgi, dgh, dhs, dh0, dc0 = persistent_bwd(m, dout.contiguous(), dh_n, dc_n, st, w_hh, batch_sizes, reverse)
    elif which == "sequence":
        dgi, dgh, dhs, dh0, dc0 = sequence_bwd(m, dout.contiguous(), dh_n, dc_n, st, w_hh, w_hr, batch_sizes, reverse)
    else:
        bs = None if batch_sizes is None else batch_sizes.tolist()
        dgi, dgh, dhs, dh0, dc0 = step_bwd(m, dout.contiguous(), dh_n, dc_n, st, w_hh, w_hr, bs, reverse)
    dgi, dgh = dgi.flatten(0, 1), dgh.flatten(0, 1)
    dx = (dgi @ w_ih).view(T, B, -1)
    dw_ih = dgi.t() @ x.reshape(T * B, -1)
    h_prev = st.hs[1:] if reverse else st.hs[:-1]
    dw_hh = dgh.t() @ h_prev.reshape(T * B, -1)
    db_ih = db_hh = None
    if has_bias:
        db_ih = dgi.sum(0, dtype=dh0.dtype).to(dgi.dtype)
        db_hh = dgh.sum(0, dtype=dh0.dtype).to(dgh.dtype)
    dw_hr = None
    if w_hr is not None:
        dh_out = dhs if mask is None else dhs * mask
        dw_hr = dh_out.flatten(0, 1).t().to(st.ms.dtype) @ st.ms.flatten(0, 1)
    return LayerGrads(dx, dh0.to(dout.dtype), None if dc0 is None else dc0.to(dout.dtype),
                      dw_ih, dw_hh, db_ih, db_hh, dw_hr)
