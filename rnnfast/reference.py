"""The ``reference`` backend: pure PyTorch, a loop over time, autograd for backward.

This file is the readable specification of rnnfast's math. Each cell's gate
equations are written once, in :func:`cell_update`, in torch's gate order:

* LSTM (gates i, f, g, o)::

      i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh)
      c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
      h' = (sigmoid(o) * tanh(c')) W_hr^T        # W_hr only with proj_size > 0

* GRU (gates r, z, n; the hidden bias of n sits inside r * (...))::

      r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
      n = tanh(gi_n + r * gh_n)                  # gh_n = h W_hn^T + b_hn
      h' = (1 - z) * n + z * h

* Elman RNN::

      h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)   # or relu

Every fast backend is tested against this file and against ``torch.nn``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import Backend, LayerWeights, register_backend


def cell_update(
    mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """Gate nonlinearities and state update from the two pre-activations.

    ``gi = x W_ih^T + b_ih`` and ``gh = h W_hh^T + b_hh`` (``(B, G * H)`` each).
    Returns ``(h', c')`` before any projection; ``c'`` is ``None`` except for LSTM.
    """
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


class ReferenceBackend(Backend):
    """Pure-PyTorch backend: runs everywhere, supports every option."""

    name = "reference"

    def layer(
        self,
        mode: str,
        x: Tensor,
        batch_sizes: Optional[Tensor],
        h0: Tensor,
        c0: Optional[Tensor],
        w: LayerWeights,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        T = x.size(0)
        gi_all = F.linear(x, w.w_ih, w.b_ih)  # input projection for all steps at once
        active = None
        if batch_sizes is not None:
            rows = torch.arange(x.size(1)).unsqueeze(0)
            active = (rows < batch_sizes.unsqueeze(1)).to(x.device).unsqueeze(-1)  # (T, B, 1)
        h, c = h0, c0
        outs: list[Tensor] = [x.new_empty(0)] * T
        for t in range(T - 1, -1, -1) if reverse else range(T):
            gh = F.linear(h, w.w_hh, w.b_hh)
            h_new, c_new = cell_update(mode, gi_all[t], gh, h, c)
            if w.w_hr is not None:
                h_new = F.linear(h_new, w.w_hr)
            if active is not None:
                # rows past their sequence's end keep their state and output zeros
                h_new = torch.where(active[t], h_new, h)
                if c is not None:
                    c_new = torch.where(active[t], c_new, c)
                outs[t] = h_new * active[t]
            else:
                outs[t] = h_new
            h, c = h_new, c_new
        return torch.stack(outs), h, c

    def cell(
        self,
        mode: str,
        x: Tensor,
        h: Tensor,
        c: Optional[Tensor],
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
    ) -> tuple[Tensor, Optional[Tensor]]:
        return cell_update(mode, F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h, c)


register_backend("reference", ReferenceBackend)
