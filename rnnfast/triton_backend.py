"""The ``triton`` backend: fused Triton kernels (:mod:`rnnfast.kernels`) for
every layer and cell, with autograd.

Layers, directions and dropout are stacked by :meth:`Backend.rnn`; each layer
direction is one call of the operator ``rnnfast::triton_layer_fwd`` (backward:
``rnnfast::triton_layer_bwd``), opaque to torch.compile. Forward and backward run the kernel
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

from .backend import Backend, LayerWeights, RNNSpec, get_backend, refuse_double_backward

try:
    from .kernels import FwdState, layer_outputs, rnn_bwd, rnn_fwd
    from .kernels.rnn import active_mask
    from .kernels.step import alloc_fwd
    from .kernels.utils import MODE_ID, NUM_GATES
except ImportError as err:  # triton missing
    _IMPORT_ERROR: Optional[str] = f"triton is not importable: {err}"
else:
    _IMPORT_ERROR = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# One layer direction as two operators, so that torch.compile treats the kernels as opaque calls
# (dynamo would otherwise trace into Triton's launcher, or into the interpreter's numpy emulation)
# and sees their outputs through the fake kernels. What rnn_fwd leaves absent (cs without LSTM,
# ms without projection, gs without save) travels as an empty tensor.


@torch.library.custom_op("rnnfast::triton_layer_fwd", mutates_args=())
def _layer_fwd(x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], mode: str,
               reverse: bool, save: bool, kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = rnn_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, save, kernel)
    return tuple(x.new_empty(0) if t is None else t for t in st)


@_layer_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, mode, reverse, save, kernel):
    gx = x.new_empty(x.shape[0], x.shape[1], w_ih.shape[0])
    st = alloc_fwd(MODE_ID[mode], gx, h0, c0, w_hh.shape[0] // NUM_GATES[MODE_ID[mode]], w_hr is not None, reverse,
                   save)
    return tuple(x.new_empty(0) if t is None else t for t in st)


@torch.library.custom_op("rnnfast::triton_layer_bwd", mutates_args=())
def _layer_bwd(dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor, hs: Tensor, cs: Optional[Tensor],
               ms: Optional[Tensor], gs: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], has_bias: bool,
               batch_sizes: Optional[Tensor], mode: str, reverse: bool,
               kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = rnn_bwd(mode, dout, dh_n, dc_n, x, FwdState(hs, cs, ms, gs), w_ih, w_hh, w_hr, has_bias, batch_sizes,
                reverse, kernel)
    return tuple(x.new_empty(0) if t is None else t for t in g)


@_layer_bwd.register_fake
def _(dout, dh_n, dc_n, x, hs, cs, ms, gs, w_ih, w_hh, w_hr, has_bias, batch_sizes, mode, reverse, kernel):
    like = lambda t, present=True: t.new_empty(t.shape) if present and t is not None else x.new_empty(0)  # noqa: E731
    bias = w_ih.new_empty(w_ih.shape[0]) if has_bias else x.new_empty(0)
    return (like(x), like(dh_n), like(dc_n), like(w_ih), like(w_hh), bias, like(bias), like(w_hr))


def _setup_context(ctx, inputs, output) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, mode, reverse, _save, kernel = inputs
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, batch_sizes, *output)
    ctx.mode, ctx.reverse, ctx.kernel, ctx.has_bias = mode, reverse, kernel, b_ih is not None
    ctx.lstm = c0 is not None


def _backward(ctx, dhs, dcs, _dms, _dgs):
    """Gradients of the states by time back to (dout, dh_n, dc_n) for rnn_bwd. h_n is hs at the
    last walked step, where out's last gradient lands too: rnn_bwd adds the two for rows still
    running then; for packed rows that ended earlier (forward direction) h_n is their carried
    state, and its gradient goes in as dh_n."""
    refuse_double_backward("triton")
    x, w_ih, w_hh, w_hr, batch_sizes, hs, cs, ms, gs = ctx.saved_tensors
    T, reverse = x.shape[0], ctx.reverse
    i_n = 0 if reverse else T
    dout = dhs[:-1] if reverse else dhs[1:]
    dh_n = torch.zeros_like(dhs[i_n])
    if batch_sizes is not None and not reverse and T > 0:
        dh_n = dhs[T] * ~active_mask(batch_sizes, x.shape[1], x.device)[T - 1]
    g = _layer_bwd(dout, dh_n, dcs[i_n] if ctx.lstm else None, x, hs, cs if ctx.lstm else None,
                   ms if w_hr is not None else None, gs, w_ih, w_hh, w_hr, ctx.has_bias, batch_sizes, ctx.mode,
                   reverse, ctx.kernel)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = g
    bias = ctx.has_bias
    return (dx, dh0, dc0 if ctx.lstm else None, dw_ih, dw_hh, db_ih if bias else None, db_hh if bias else None,
            dw_hr if w_hr is not None else None, None, None, None, None, None)


_layer_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w: LayerWeights, batch_sizes: Optional[Tensor],
          reverse: bool, kernel: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(out, h_n, c_n)`` of one layer direction on time-major ``x``."""
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h0, c0, *w))
    hs, cs, ms, gs = _layer_fwd(x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, batch_sizes, mode, reverse, save,
                                kernel)
    return layer_outputs(FwdState(hs, cs if c0 is not None else None, ms if w.w_hr is not None else None,
                                  gs if save else None), batch_sizes, reverse)


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
        return layer(mode, x, h0, c0, w, batch_sizes, reverse, self.kernel)

    def cell(self, mode: str, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        _, h_n, c_n = layer(mode, x.unsqueeze(0), h, c, LayerWeights(w_ih, w_hh, b_ih, b_hh, None), None, False,
                            "step")
        return h_n, c_n
