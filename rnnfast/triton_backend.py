"""The ``triton`` backend: fused Triton kernels (:mod:`rnnfast.kernels`) for
every layer and cell, with autograd.

Layers, directions and dropout are stacked by :meth:`Backend.rnn`; each layer
direction is one :class:`RNNLayerFunction`. Forward and backward run the kernel
:func:`rnnfast.kernels.choose_kernel` picks: the persistent kernels (one launch,
hidden slices x batch groups synchronised per step) without projection, else the
sequence kernels (one launch) for small sizes or the step kernels (one launch per
step, pre-bound on a GPU); cells run the step kernels. Without
a GPU the kernels run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), slowly. float32 ``tl.dot`` runs as 3xTF32 on the
tensor cores (``input_precision="tf32x3"``, about float32 accuracy), or plain
TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backend import Backend, LayerWeights, RNNSpec, get_backend

try:
    from .kernels import FwdState, layer_outputs, rnn_bwd, rnn_fwd
except ImportError as err:  # triton missing
    _IMPORT_ERROR: Optional[str] = f"triton is not importable: {err}"
else:
    _IMPORT_ERROR = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RNNLayerFunction(torch.autograd.Function):
    """One layer direction: ``(out, h_n, c_n)`` from ``x`` ``(T, B, I)`` and the states."""

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], mode: str,
                batch_sizes: Optional[Tensor], reverse: bool, kernel: str):
        save = any(ctx.needs_input_grad[:8])
        st = rnn_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, save, kernel)
        out, h_n, c_n = layer_outputs(st, batch_sizes, reverse)
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, *st)
        ctx.mode, ctx.batch_sizes, ctx.reverse, ctx.kernel = mode, batch_sizes, reverse, kernel
        ctx.has_bias = b_ih is not None
        return out, h_n, c_n

    @staticmethod
    @once_differentiable  # the backward kernels have no derivative: double backward raises
    def backward(ctx, dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor]):
        x, w_ih, w_hh, w_hr, *st = ctx.saved_tensors
        st = FwdState(*st)
        g = rnn_bwd(ctx.mode, dout, dh_n, dc_n, x, st, w_ih, w_hh, w_hr, ctx.has_bias, ctx.batch_sizes,
                    ctx.reverse, ctx.kernel)
        return g.dx, g.dh0, g.dc0, g.dw_ih, g.dw_hh, g.db_ih, g.db_hh, g.dw_hr, None, None, None, None


class TritonBackend(Backend):
    """Fused Triton kernels for every layer option and cell (GPU, or CPU under the interpreter)."""

    name = "triton"
    # "auto" (see kernels.choose_kernel), else "persistent", "sequence" or "step"
    kernel = "auto"

    def unavailable_reason(self) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU)"
        return None

    def unsupported_reason(self, spec: RNNSpec, x: Tensor, packed: bool) -> Optional[str]:
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if x.device.type not in ("cpu", "cuda"):
            return f"device {x.device.type} is not supported"
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype} is not supported (float32, float16, bfloat16, float64 are)"
        if x.dtype == torch.float64 and x.device.type == "cuda":
            # the 2026-11-26 H200 check failed to compile the float64 sequence kernel (accumulator dtype)
            return "float64 on CUDA is not supported yet (float32, float16, bfloat16 are)"
        if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            return "the Triton interpreter computes bfloat16 tl.dot wrongly (GPU only)"
        return None

    def layer(self, mode: str, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
              w: LayerWeights, reverse: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        if x.size(1) == 0:  # an empty batch has nothing to launch: the reference gives the empty results
            return get_backend("reference").layer(mode, x, batch_sizes, h0, c0, w, reverse)
        return RNNLayerFunction.apply(x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, mode, batch_sizes,
                                      reverse, self.kernel)

    def cell(self, mode: str, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        _, h_n, c_n = RNNLayerFunction.apply(x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh, None, mode, None, False,
                                             "step")
        return h_n, c_n
