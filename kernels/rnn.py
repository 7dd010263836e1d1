"""Host side of one layer direction: the input projection GEMM, the recurrent
kernels (sequence or step, chosen in :func:`~.utils.use_sequence_kernel`) and,
in backward, the weight-gradient GEMMs over all steps."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .sequence import sequence_bwd, sequence_fwd
from .step import FwdState, step_bwd, step_fwd
from .utils import MODE_ID, NUM_GATES, use_sequence_kernel


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

    ``save`` keeps the gates for :func:`rnn_bwd`; ``kernel`` forces ``"step"``
    or ``"sequence"`` (default: the sequence kernel for small hidden sizes).
    """
    m = MODE_ID[mode]
    gx = F.linear(x, w_ih, b_ih).contiguous()
    w_hh, w_hr = w_hh.contiguous(), None if w_hr is None else w_hr.contiguous()
    if use_sequence_kernel(kernel, w_hh.size(0) // NUM_GATES[m], w_hh.size(1), m, gx.dtype):
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
    outputs; ``kernel`` as there (the sequence kernel for small hidden sizes)."""
    m = MODE_ID[mode]
    T, B, _ = dout.shape
    mask = None if batch_sizes is None else active_mask(batch_sizes, B, dout.device)
    if mask is not None:
        dout = dout * mask
    w_hh, w_hr = w_hh.contiguous(), None if w_hr is None else w_hr.contiguous()
    if use_sequence_kernel(kernel, w_hh.size(0) // NUM_GATES[m], w_hh.size(1), m, dout.dtype, backward=True):
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
