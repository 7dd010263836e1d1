"""The ``triton`` backend: fused Triton kernels (:mod:`rnnfast.kernels`) for
every layer and cell, with autograd.

Layers, directions and dropout are stacked by :meth:`Backend.rnn`; each layer
direction is one autograd call of :func:`layer`'s kernels (under torch.compile
the operators ``rnnfast::triton_layer_fwd`` / ``triton_layer_bwd``, opaque to Dynamo). Forward and backward run the kernel
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
from typing import Iterable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .backend import GATES, Backend, LayerWeights, RNNSpec, first_order, get_backend

try:
    from .kernels import FwdState, layer_outputs, rnn_bwd, rnn_fwd
    from .kernels.rnn import active_mask
    from .kernels.step import alloc_fwd
    from .kernels.rnn import KERNELS
    from .kernels.utils import MODE_ID, NUM_GATES, NUM_SAVED
except ImportError as err:  # triton missing
    _IMPORT_ERROR: Optional[str] = f"triton is not importable: {err}"
else:
    _IMPORT_ERROR = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# One layer direction: _fwd and _bwd run the kernels. Eagerly they run through _Layer (an
# autograd.Function); under torch.compile through the operators rnnfast::triton_layer_fwd/bwd, which
# Dynamo treats as opaque calls (it would otherwise trace into Triton's launcher, or the interpreter's
# numpy emulation) and sees through their fake kernels. The operators cost ~40 us more per call than
# the Function, which short GPU calls would feel. What rnn_fwd leaves absent (cs without LSTM, ms
# without projection, gs without save) travels as an empty tensor.


def _fwd(x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
         b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], mode: str, reverse: bool,
         save: bool, kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = rnn_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, save, kernel)
    return tuple(x.new_empty(0) if t is None else t for t in st)


def _bwd(dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor, hs: Tensor, cs: Optional[Tensor],
         ms: Optional[Tensor], gs: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], has_bias: bool,
         batch_sizes: Optional[Tensor], mode: str, reverse: bool,
         kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = rnn_bwd(mode, dout, dh_n, dc_n, x, FwdState(hs, cs, ms, gs), w_ih, w_hh, w_hr, has_bias, batch_sizes,
                reverse, kernel)
    return tuple(x.new_empty(0) if t is None else t for t in g)


def _check(op: str, mode: str, kernel: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
           w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], **more: Optional[Tensor]) -> None:
    """RuntimeError naming the argument for a direct operator call that the kernels cannot run (the
    layers build valid calls; the kernels would read out of bounds on some bad ones)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"rnnfast::{op}: {what}")

    need(mode in GATES, f"unknown mode {mode!r} (one of {', '.join(GATES)})")
    need(kernel in KERNELS, f"unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")
    need(x.dim() == 3 and w_ih.dim() == 2 and w_hh.dim() == 2, "input must be 3-D, weight_ih and weight_hh 2-D")
    T, B, I = x.shape
    need(T > 0 and B > 0, f"input has shape {list(x.shape)}: no steps or no rows to run")
    G, K = GATES[mode], w_hh.shape[1]
    need(w_hh.shape[0] > 0 and w_hh.shape[0] % G == 0, f"weight_hh needs a positive multiple of {G} rows")
    H = w_hh.shape[0] // G
    shapes = dict(weight_ih=(w_ih, (G * H, I)), weight_hh=(w_hh, (G * H, K)), h0=(h0, (B, K)), c0=(c0, (B, H)),
                  weight_hr=(w_hr, (K, H)), **{name: (t, (G * H,) if name.startswith("bias") else (T, B, K))
                                               for name, t in more.items()})
    need((c0 is not None) == (mode == "LSTM"), "c0 must be given for LSTM and only for LSTM")
    need(w_hr is None or mode == "LSTM", "weight_hr (proj_size) is only supported for LSTM")
    need(w_hr is not None or K == H, f"weight_hh has {K} columns, must be hidden size {H} without weight_hr")
    for name, (t, shape) in shapes.items():
        if t is None:
            continue
        need(tuple(t.shape) == shape, f"{name} has shape {list(t.shape)}, expected {list(shape)}")
        need(t.device == x.device, f"{name} is on {t.device}, must be on the input's device {x.device}")
        need(t.dtype == x.dtype or name == "c0", f"{name} has dtype {t.dtype}, must be the input's {x.dtype}")
    need(x.dtype in DTYPES, f"input has dtype {x.dtype}, expected one of {DTYPES}")
    if batch_sizes is not None:
        need(batch_sizes.dim() == 1 and batch_sizes.numel() == T and not batch_sizes.is_floating_point()
             and batch_sizes.device.type == "cpu", "batch_sizes must be an integer CPU tensor with one entry per step")
        if is_fake(batch_sizes):  # tracing: the values are not there
            return
        bs = batch_sizes.tolist()
        need(all(B >= a >= b >= 1 for a, b in zip(bs, bs[1:] + bs[-1:])),
             f"batch_sizes must be non-increasing, between 1 and the batch size {B}")


def _checked_fwd(x: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], mode: str,
                 reverse: bool, save: bool, kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check("triton_layer_fwd", mode, kernel, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, bias_ih=b_ih, bias_hh=b_hh)
    if (b_ih is None) != (b_hh is None):
        raise RuntimeError("rnnfast::triton_layer_fwd: bias_ih and bias_hh must both be given or both be None")
    return _fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, mode, reverse, save, kernel)


def _checked_bwd(dout: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor, hs: Tensor, cs: Optional[Tensor],
                 ms: Optional[Tensor], gs: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                 has_bias: bool, batch_sizes: Optional[Tensor], mode: str, reverse: bool,
                 kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check("triton_layer_bwd", mode, kernel, x, dh_n, dc_n, w_ih, w_hh, w_hr, batch_sizes, grad_out=dout)
    T, B, _ = x.shape
    H = w_hh.shape[0] // GATES[mode]
    saved = [("hs", hs, (T + 1, B, w_hh.shape[1])), ("gs", gs, (T, B, NUM_SAVED[MODE_ID[mode]] * H))]
    saved += [("cs", cs, (T + 1, B, H))] if mode == "LSTM" else []
    saved += [("ms", ms, (T, B, H))] if w_hr is not None else []
    for name, t, shape in saved:
        if t is None or tuple(t.shape) != shape or t.device != x.device:
            raise RuntimeError(f"rnnfast::triton_layer_bwd: {name} must be what triton_layer_fwd saved, "
                               f"shape {list(shape)} on {x.device}")
    return _bwd(dout, dh_n, dc_n, x, hs, cs, ms, gs, w_ih, w_hh, w_hr, has_bias, batch_sizes, mode, reverse, kernel)


# the operators check their arguments (direct calls); _Layer's calls come from the layers, valid
_fwd_op = torch.library.custom_op("rnnfast::triton_layer_fwd", _checked_fwd, mutates_args=())
_bwd_op = torch.library.custom_op("rnnfast::triton_layer_bwd", _checked_bwd, mutates_args=())


@_fwd_op.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, mode, reverse, save, kernel):
    # a call mixing devices (meta among them) lands here, never reaching the real kernel's checks
    _check("triton_layer_fwd", mode, kernel, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, bias_ih=b_ih, bias_hh=b_hh)
    gx = x.new_empty(x.shape[0], x.shape[1], w_ih.shape[0])
    st = alloc_fwd(MODE_ID[mode], gx, h0, c0, w_hh.shape[0] // NUM_GATES[MODE_ID[mode]], w_hr is not None, reverse,
                   save)
    return tuple(x.new_empty(0) if t is None else t for t in st)


@_bwd_op.register_fake
def _(dout, dh_n, dc_n, x, hs, cs, ms, gs, w_ih, w_hh, w_hr, has_bias, batch_sizes, mode, reverse, kernel):
    _check("triton_layer_bwd", mode, kernel, x, dh_n, dc_n, w_ih, w_hh, w_hr, batch_sizes, grad_out=dout)
    like = lambda t: x.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    bias = w_ih.new_empty(w_ih.shape[0]) if has_bias else None
    return (like(x), like(dh_n), like(dc_n), like(w_ih), like(w_hh), like(bias), like(bias), like(w_hr))


def _setup_context(ctx, inputs, output) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, mode, reverse, _save, kernel = inputs
    ctx.save_for_backward(x, w_ih, w_hh, w_hr, batch_sizes, *output)
    ctx.mode, ctx.reverse, ctx.kernel, ctx.has_bias = mode, reverse, kernel, b_ih is not None
    ctx.lstm = c0 is not None
    ctx.set_materialize_grads(False)  # no zeros the size of the saved gates


def _backward(ctx, saved: tuple, dhs: Optional[Tensor], dcs: Optional[Tensor], bwd) -> tuple:
    """Gradients of the states by time back to (dout, dh_n, dc_n) for rnn_bwd. h_n is hs at the
    last walked step, where out's last gradient lands too: rnn_bwd adds the two for rows still
    running then; for packed rows that ended earlier (forward direction) h_n is their carried
    state, and its gradient goes in as dh_n."""
    x, w_ih, w_hh, w_hr, batch_sizes, hs, cs, ms, gs = saved
    T, reverse = x.shape[0], ctx.reverse
    i_n = 0 if reverse else T
    dhs = torch.zeros_like(hs) if dhs is None else dhs
    dout = dhs[:-1] if reverse else dhs[1:]
    dh_n = torch.zeros_like(dhs[i_n])
    if batch_sizes is not None and not reverse and T > 0:
        dh_n = dhs[T] * ~active_mask(batch_sizes, x.shape[1], x.device)[T - 1]
    dc_n = None
    if ctx.lstm:
        dc_n = torch.zeros_like(cs[i_n]) if dcs is None else dcs[i_n]
    g = bwd(dout, dh_n, dc_n, x, hs, cs if ctx.lstm else None, ms if w_hr is not None else None, gs, w_ih, w_hh,
            w_hr, ctx.has_bias, batch_sizes, ctx.mode, reverse, ctx.kernel)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = g
    bias = ctx.has_bias
    return (dx, dh0, dc0 if ctx.lstm else None, dw_ih, dw_hh, db_ih if bias else None, db_hh if bias else None,
            dw_hr if w_hr is not None else None, None, None, None, None, None)


_fwd_op.register_autograd(
    first_order("triton", lambda ctx, saved, dhs, dcs, _dms, _dgs: _backward(ctx, saved, dhs, dcs, _bwd_op)),
    setup_context=_setup_context)


def _under_func(tensors: Iterable[Optional[Tensor]]) -> bool:
    """Whether a call runs under a torch.func transform or on its wrapped tensors (a vjp function called
    after torch.func.vjp returned holds wrappers of a transform that has ended): only the operators see
    through them."""
    return torch._C._are_functorch_transforms_active() or any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _Layer(torch.autograd.Function):
    """The eager twin of rnnfast::triton_layer_fwd, with the same autograd; under torch.func it calls the
    operators, and under vmap each sample runs on its own (the operators have no batching rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return (_fwd_op if _under_func(args[:8]) else _fwd)(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(first_order("triton", lambda ctx, saved, dhs, dcs, _dms, _dgs: _backward(
        ctx, saved, dhs, dcs, _bwd_op if _under_func((*saved, dhs, dcs)) else _bwd)))


def layer(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w: LayerWeights, batch_sizes: Optional[Tensor],
          reverse: bool, kernel: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(out, h_n, c_n)`` of one layer direction on time-major ``x``."""
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, h0, c0, *w))
    fwd = _fwd_op if torch.compiler.is_compiling() else _Layer.apply
    hs, cs, ms, gs = fwd(x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, batch_sizes, mode, reverse, save, kernel)
    out, h_n, c_n = layer_outputs(FwdState(hs, cs if c0 is not None else None, ms if w.w_hr is not None else None,
                                           gs if save else None), batch_sizes, reverse)
    if not save:
        return out, h_n, c_n
    # views of the saved states: handed back as copies, which may then change in place, as torch.nn's outputs may
    copy = lambda t: t if t is None or t._base is None else t.clone()  # noqa: E731
    return copy(out), copy(h_n), copy(c_n)


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
