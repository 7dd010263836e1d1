"""The ``cpu`` backend: fused C++/OpenMP kernels from the ``rnnfast._C`` extension.

Training and long sequences go through the operators ``rnnfast::layer_fwd`` and
``rnnfast::layer_bwd`` (one layer and direction per call; autograd and fake
kernels registered here, so ``torch.compile`` traces them); the forward keeps what
backward needs only when autograd will ask for it. Inference on short
sequences with a small batch takes ``_C.decode``: the whole stack in one call,
with the weights packed once and cached until a parameter changes. Eager inference
on a PackedSequence runs each layer on the packed data itself (``_C.layer_packed``).

Importing this module imports the extension; if that fails the backend is
registered as unavailable with the error as its reason (see ``register_lazy``).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from . import _C
from .backend import (GATES, MODE_ID, MODES, Backend, LayerWeights, RNNSpec, first_order, layer_grads_with_graph,
                      run_stack)

# bfloat16 runs the fused loops, forward and backward, with AVX512-BF16 products on CPUs that
# have them, else the float32 loops on widened copies; float16 the float32 loops on widened copies
# (CPUs have no float16 loop here; torch.nn's float16 CPU layers ran 5-10x slower than its float32).
# What the forward saves is float32 for both.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
WIDENED = (torch.bfloat16, torch.float16)
# The decode path (a GEMV per row over cached packed weights) beats the fused loop on
# one or two rows (T * B); the stepwise loop's GEMM calls (float64, CPUs without
# AVX-512) only from about T = 16 or B = 8 on.
DECODE_MAX_ROWS = 2
DECODE_MAX_T = 16
DECODE_MAX_B = 8
# A float32 cell's step on one or two rows takes the decode path only below this many multiply-adds a
# row (gates x hidden x (input + hidden)): beyond, the fused loop's cached panels ran it 1.1-1.8x as fast
# (LSTMCell B1 H256 1.79x, GRUCell B2 H256 1.45x, RNNCell B1 H512 1.57x; 2-core Xeon,
# bench/results/2026-12-07-cpu-cell-decode-ab.md). A layer's decode runs its whole stack in one call.
CELL_DECODE_MAX_MACS = 1 << 16
# Two steps of one row (T=2, B=1) take a float32 stack's decode path only below this many multiply-adds
# a row in a layer: the decode path goes step by step through every layer, reading each layer's weights
# once a step, where the layer loop reads them once a call. From about here the loop ran it 1.0-1.5x as
# fast (2-core Xeon, bench/results/2026-12-07-cpu-decode-t2-ab.md).
DECODE_T2_MAX_MACS = 1 << 17
_FUSED_LOOP = _C.has_fused_loop()
_BF16_LOOP = _C.has_bf16_loop()


def _narrow(dtype: torch.dtype, mode: str, I: int, H: int, P: int, limit: int) -> bool:  # noqa: E741
    """Whether a step of H units from I inputs and a state of P (H, or proj_size) stays under ``limit``
    multiply-adds a row (gates x H x (I + P)), the width from which the fused loop beats the decode path
    in float32; other dtypes, and CPUs without the fused loop, keep the decode path at any width."""
    return dtype != torch.float32 or not _FUSED_LOOP or GATES[mode] * H * (I + P) < limit


def _takes_decode(dtype: torch.dtype, T: int, B: int) -> bool:
    """Whether T steps of B rows in dtype run faster on the decode path than in the loops (float16: it
    has no float16 GEMV)."""
    if dtype == torch.float16:
        return False
    if dtype == torch.bfloat16:  # its GEMV needs AVX512-BF16 or AVX2 (widening) to beat the loops
        return (_BF16_LOOP or _FUSED_LOOP) and T * B <= DECODE_MAX_ROWS
    if dtype == torch.float32 and _FUSED_LOOP:
        return T * B <= DECODE_MAX_ROWS
    return T <= DECODE_MAX_T and B <= DECODE_MAX_B

_ops = torch.ops.rnnfast


def _check_fake(op: str, mode: int, **tensors: Optional[Tensor]) -> None:
    """A call mixing devices dispatches to the fake kernel (meta outranks CPU), never reaching the
    C++ checks: check the mode and the devices there as they would."""
    torch._check(0 <= mode < len(MODES), lambda: f"rnnfast::{op}: unknown mode {mode}")
    x, h0, w_hh = tensors["x"], tensors["h0"], tensors["w_hh"]
    torch._check(x.dim() == 3 and h0.dim() == 2 and w_hh.dim() == 2, lambda: (
        f"rnnfast::{op}: input must be 3-D, h0 and weight_hh 2-D; got {x.dim()}-D, {h0.dim()}-D, {w_hh.dim()}-D"))
    torch._check(mode != 0 or tensors["c0"] is not None, lambda: f"rnnfast::{op}: LSTM needs c0")
    device = x.device
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == device,
                         lambda: f"rnnfast::{op}: {name} is on {t.device}, must be on the input's device {device}")


@torch.library.register_fake("rnnfast::layer_fwd")
def _layer_fwd_fake(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, save):
    _check_fake("layer_fwd", mode, x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // GATES[MODES[mode]]
    empty = h0.new_empty(0)
    out = h0.new_empty(T, B, h0.shape[1])  # outputs and states in h0's dtype (float32 beside bfloat16 under autocast)
    saved = torch.float32 if x.dtype in WIDENED else x.dtype  # what backward needs
    none = x.new_empty(0, dtype=saved)
    if not save:
        return out, h0.new_empty(h0.shape), c0.new_empty(c0.shape) if mode == 0 else empty, none, none
    if mode == 0:
        ws2 = x.new_empty(2 if w_hr is not None else 1, T, B, H, dtype=saved)
        return out, h0.new_empty(h0.shape), c0.new_empty(c0.shape), x.new_empty(T, B, 4 * H, dtype=saved), ws2
    ws1 = x.new_empty(T, B, 4 * H, dtype=saved) if mode == 1 else none
    return out, h0.new_empty(h0.shape), empty, ws1, none


@torch.library.register_fake("rnnfast::layer_bwd")
def _layer_bwd_fake(mode, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, has_bias, reverse, out, ws1, ws2, g_out, g_hn,
                    g_cn, need_dx=True, need_dh0=True, need_dw=True):
    _check_fake("layer_bwd", mode, x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, out=out, ws1=ws1, ws2=ws2,
                grad_out=g_out, grad_hn=g_hn, grad_cn=g_cn)
    empty = x.new_empty(0)
    bias = w_ih.new_empty(w_ih.shape[0]) if has_bias else empty
    return (
        x.new_empty(x.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape) if mode == 0 else empty,
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        bias,
        bias.new_empty(bias.shape),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else empty,
    )


def _setup_context(ctx, inputs, output) -> None:
    mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, _save = inputs
    out, _, _, ws1, ws2 = output
    ctx.mode, ctx.reverse, ctx.has_bias = mode, reverse, b_ih is not None
    # a copy of the output, which may then change in place (see saved_output in csrc/cpu/autograd.cpp)
    ctx.save_for_backward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, out.clone(), ws1, ws2)
    # no zeros the size of the saved gates for their (never used) gradients: 26 MB to fill per layer
    # at T100 B64 H256 float32; _layer_bwd makes the zeros it reads (states, an unused output)
    ctx.set_materialize_grads(False)


def _needs(needs_input_grad: tuple) -> tuple[bool, bool, bool]:
    """layer_bwd's need_dx, need_dh0, need_dw from layer_fwd's needs_input_grad (x 1, h0 3, weights 5-9)."""
    return needs_input_grad[1], needs_input_grad[3], any(needs_input_grad[5:10])


def _layer_bwd(ctx, saved, g_out, g_hn, g_cn, _g_ws1, _g_ws2):
    x, batch_sizes, h0, c0, w_ih, w_hh, _, _, w_hr, out, ws1, ws2 = saved
    lstm = ctx.mode == 0
    g_out = torch.zeros_like(out) if g_out is None else g_out
    g_hn = torch.zeros_like(h0) if g_hn is None else g_hn
    g_cn = (torch.zeros_like(c0) if g_cn is None else g_cn) if lstm else x.new_empty(0)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = _ops.layer_bwd(
        ctx.mode, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, ctx.has_bias, ctx.reverse, out, ws1, ws2,
        g_out, g_hn, g_cn, *_needs(ctx.needs_input_grad),
    )
    bias = ctx.has_bias
    return (None, dx, None, dh0, dc0 if lstm else None, dw_ih, dw_hh, db_ih if bias else None,
            db_hh if bias else None, dw_hr if w_hr is not None else None, None, None)


def _grads_with_graph(mode: int, reverse: bool, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor,
                      c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                      w_hr: Optional[Tensor], g_out: Optional[Tensor], g_hn: Optional[Tensor],
                      g_cn: Optional[Tensor]) -> Optional[tuple[Optional[Tensor], ...]]:
    """layer_fwd's gradients w.r.t. (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) as a graph (layer_grads_with_graph):
    the backward of the operator and of the eager C++ node when autograd asks for a graph."""
    return layer_grads_with_graph("cpu", MODES[mode], reverse, x, batch_sizes, h0, c0 if mode == 0 else None,
                                  LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr), (g_out, g_hn, g_cn if mode == 0 else None))


def _layer_with_graph(ctx, saved, g_out, g_hn, g_cn, _g_ws1, _g_ws2):
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _, _, _ = saved
    got = _grads_with_graph(ctx.mode, ctx.reverse, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                            g_out, g_hn, g_cn)
    if got is None:  # no graph to be had (see layer_grads_with_graph): first_order's fused backward
        return None
    dx, dh0, dc0, *dw = got
    return (None, dx, None, dh0, dc0, *dw, None, None)


_backward = first_order("cpu", _layer_bwd, _layer_with_graph)
_C.set_grads_with_graph(_grads_with_graph)
torch.library.register_autograd("rnnfast::layer_fwd", _backward, setup_context=_setup_context)


class _Layer(torch.autograd.Function):
    """layer_fwd with the same autograd as registered on the operator, for eager calls that need
    gradients: torch.func transforms (``torch.func.grad``, as torch.nn's layers allow) reject the
    Function torch generates for an operator, which has no ``setup_context``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return _ops.layer_fwd(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _eager() -> bool:
    """Whether a call runs eagerly: not traced by torch.compile, not under a torch.func transform
    (both take the operator, not the extension's eager entries)."""
    return not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _layer_fwd(*args):
    """layer_fwd, its last argument (``save``) saying whether autograd will ask for gradients. Eager
    calls take ``_C.layer_fwd_eager``: with gradients the same backward as a C++ autograd node (no
    Python per call in either direction, 50 us less than an autograd.Function, as long as a small
    cell's step), without them the operator below autograd (its registered autograd would only
    pass the call on, at 10 us a call); torch.compile traces the operator; torch.func transforms
    take _Layer, whose ``setup_context`` they require."""
    if _eager():
        return _C.layer_fwd_eager(*args)
    if torch.compiler.is_compiling() or not args[-1]:
        return _ops.layer_fwd(*args)
    return _Layer.apply(*args)


def _copy(t: Tensor, batch_sizes: Tensor, to_padded: bool) -> Tensor:
    """PackedSequence data to (T, B, *) (``to_padded``, zeros past each row's end) or back, in the extension."""
    return (_C.pad_packed if to_padded else _C.pack_padded)(t, batch_sizes)


class _Convert(torch.autograd.Function):
    """_copy with autograd: each conversion is the other's adjoint, so its backward is the other one."""

    @staticmethod
    def forward(ctx, t: Tensor, batch_sizes: Tensor, to_padded: bool) -> Tensor:
        ctx.save_for_backward(batch_sizes)
        ctx.to_padded = to_padded
        return _copy(t, batch_sizes, to_padded)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Convert.apply(grad, ctx.saved_tensors[0], not ctx.to_padded), None, None


def _convert(t: Tensor, batch_sizes: Tensor, to_padded: bool) -> Optional[Tensor]:
    """The extension's conversion of an eager CPU call (through _Convert where autograd needs it), else None."""
    if not (_eager() and t.device.type == "cpu"):
        return None
    if torch.is_grad_enabled() and t.requires_grad:
        return _Convert.apply(t, batch_sizes, to_padded)
    return _copy(t, batch_sizes, to_padded)


def stack_decodes(spec: RNNSpec, batch_sizes: Optional[Tensor], needs_grad: bool) -> bool:
    """Whether a call can run as one whole-stack decode (the shape bounds aside): unidirectional,
    unpacked, no dropout to draw, no gradient, eager (not under torch.compile or a torch.func transform,
    whose wrapped tensors only the operators see through)."""
    return (
        batch_sizes is None
        and not spec.bidirectional
        and not (spec.training and spec.dropout > 0 and spec.num_layers > 1)
        and not needs_grad
        and _eager()
    )


def _needs_grad(x: Tensor, h0: Tensor, c0: Optional[Tensor], weights: Iterable[Optional[Tensor]]) -> bool:
    """Whether autograd will ask for gradients of a call; absent weights (None) need none."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or h0.requires_grad or (c0 is not None and c0.requires_grad) or any(
        w is not None and w.requires_grad for w in weights)


class CPUBackend(Backend):
    """Fused C++ kernels for CPU tensors in float32, float64, bfloat16 and float16; every layer option."""

    name = "cpu"

    def autocast(
        self, x: Tensor, weights: list[Tensor], dtype: torch.dtype, products: Optional[torch.dtype]
    ) -> tuple[Tensor, list[Tensor]]:
        """float32 weights as they are for bfloat16 products: the kernels round them once into their
        packed copies, cached until the weights change, and return float32 gradients. With float32
        states (``products`` narrower than ``dtype``) the input goes in as bfloat16 and the outputs
        come back float32 (layer_fwd's mixed call); without AVX512-BF16 such calls stay float32."""
        low = products if products is not None and _BF16_LOOP else dtype
        if low == torch.bfloat16 and all(w.dtype == torch.float32 for w in weights):
            return (x if x.dtype == low else x.to(low)), weights
        return super().autocast(x, weights, dtype, None)

    def unsupported_reason(self, spec: RNNSpec, x: Tensor, packed: bool) -> Optional[str]:
        if x.device.type != "cpu":
            return f"the input is on {x.device}, the cpu backend runs on CPU tensors only"
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype} is not supported (float32, float64, bfloat16 and float16 are)"
        return None

    def pad_packed(self, data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Eager CPU calls: one copy a step in the extension (_convert). torch's conversions cost about 40 us
        a call at small sizes, and with autograd pad_packed_sequence's backward fills a zero tensor the size
        of the packed data for every distinct batch size (LSTM T200 B64 I512 training 0.40x torch.nn, 2-core
        Xeon). torch's under torch.compile and torch.func."""
        padded = _convert(data, batch_sizes, True)
        return (padded, None) if padded is not None else super().pad_packed(data, batch_sizes)

    def pack_padded(self, out: Tensor, batch_sizes: Tensor, lengths: Optional[Tensor]) -> Tensor:
        packed = _convert(out, batch_sizes, False)
        return packed if packed is not None else super().pack_padded(out, batch_sizes, lengths)

    def rnn(
        self,
        spec: RNNSpec,
        x: Tensor,
        batch_sizes: Optional[Tensor],
        h0: Tensor,
        c0: Optional[Tensor],
        weights: list[Tensor],
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Short unidirectional inference calls take the fused decode path (two steps only on narrow
        layers, DECODE_T2_MAX_MACS), the rest run layer by layer: eager calls on unpadded input in one
        call into the extension (``_C.stack_eager``, run_stack's loop in C++), the others through
        run_stack."""
        T, P = x.size(0), spec.proj_size or spec.hidden_size
        narrow = T == 1 or _narrow(x.dtype, spec.mode, max(spec.input_size, P), spec.hidden_size, P,
                                       DECODE_T2_MAX_MACS)
        if _takes_decode(x.dtype, T, x.size(1)) and narrow and stack_decodes(spec, batch_sizes,
                                                                              _needs_grad(x, h0, c0, weights)):
            return _C.decode(MODE_ID[spec.mode], weights, spec.num_layers, spec.bias, x, h0, c0)
        if batch_sizes is None and _eager():
            return _C.stack_eager(MODE_ID[spec.mode], x, h0, c0, weights, spec.num_layers, spec.bidirectional,
                                  spec.bias, spec.dropout if spec.training else 0.0)
        return super().rnn(spec, x, batch_sizes, h0, c0, weights)

    def rnn_packed(
        self,
        spec: RNNSpec,
        data: Tensor,
        batch_sizes: Tensor,
        h0: Tensor,
        c0: Optional[Tensor],
        weights: list[Tensor],
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Eager inference runs each layer on the PackedSequence data itself (``_C.layer_packed``): the
        padded copy of the input and the products for the rows past each sequence's end were as much
        work as the loop at small hidden sizes (LSTM T200 B128 I256 H33, lengths 1-200: 0.79x torch.nn).
        Gradients, torch.compile and torch.func take the padded path."""
        if not _eager() or _needs_grad(data, h0, c0, weights):
            return super().rnn_packed(spec, data, batch_sizes, h0, c0, weights)

        def layer(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w: LayerWeights, reverse: bool):
            out, h_n, c_n = _C.layer_packed(MODE_ID[mode], x, batch_sizes, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh,
                                            w.w_hr, reverse)
            return out, h_n, c_n if mode == "LSTM" else None

        return run_stack(spec, data, None, h0, c0, weights, layer)

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
        save = _needs_grad(x, h0, c0, w)
        out, h_n, c_n, _, _ = _layer_fwd(
            MODE_ID[mode], x, batch_sizes, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, reverse, save
        )
        return out, h_n, c_n if mode == "LSTM" else None

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
        """One step; inference on one or two rows takes the decode path, as a layer's short calls do,
        where the weights are small (CELL_DECODE_MAX_MACS).
        Eager steps are one call into the extension (``_C.cell_eager``); torch.compile and torch.func
        take the operator through ``_layer_fwd``."""
        save = _needs_grad(x, h, c, (w_ih, w_hh, b_ih, b_hh))
        if not _eager():
            _, h_n, c_n, _, _ = _layer_fwd(MODE_ID[mode], x.unsqueeze(0), None, h, c, w_ih, w_hh, b_ih, b_hh, None,
                                           False, save)
            return h_n, c_n if mode == "LSTM" else None
        B, I = x.shape
        H = h.shape[1]
        decode = not save and _takes_decode(x.dtype, 1, B) and _narrow(x.dtype, mode, I, H, H, CELL_DECODE_MAX_MACS)
        return _C.cell_eager(MODE_ID[mode], x, h, c, w_ih, w_hh, b_ih, b_hh, decode, save)
