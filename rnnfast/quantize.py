"""int8 inference for recurrent layers: :func:`quantize_dynamic`, shaped like
:func:`torch.ao.quantization.quantize_dynamic`.

It turns the recurrent layers and cells of a model (``torch.nn`` or rnnfast
``RNN``/``LSTM``/``GRU`` and their ``*Cell``) into modules whose weights are int8
with one scale per output row, run by the CPU extension (``csrc/cpu/quant.cpp``):
each layer input row and each step's hidden state is quantized on the fly to
uint8 (one scale and zero point per row), the products accumulate in int32
(AVX512-VNNI ``vpdpbusd`` where the CPU has it), and the gate math runs in
float32. Decoding is bound by reading the weights, so int8 reads a quarter of the
float32 bytes.

What the quantized modules do and do not do:

* the forward contract of the float module: inputs, outputs, states, shapes,
  ``batch_first``, packed sequences, unbatched input, bidirectional, ``bias=False``,
  every ``num_layers``; input float32 on the CPU;
* inference only. Dropout is never applied: a module with ``dropout > 0`` in
  training mode raises (call ``.eval()``). A call whose input or state autograd
  tracks (an embedding's output, without ``torch.no_grad()``) runs, as torch's
  int8 layers do, but a backward through it raises, since no gradient flows
  through int8 weights. Train the float model, then quantize;
* under CPU autocast a bfloat16 or float16 input (and state) is cast to float32,
  and the outputs are float32: the modules compute in float32 and int8;
* ``proj_size > 0`` raises ``NotImplementedError`` at quantize time;
* other modules (``nn.Linear``, embeddings, ...) are left as they are: quantize
  those with torch's own ``quantize_dynamic``, before or after this one.

``state_dict`` holds, under the float module's names, the int8 weights
(``weight_ih_l0``), their per-row float32 scales (``weight_ih_l0_scale``) and the
float32 biases; the kernel's packed copy is rebuilt from them when needed.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import modules as _modules
from .backend import GATES, MODE_ID

__all__ = ["quantize_dynamic", "QuantizedRNN", "QuantizedLSTM", "QuantizedGRU", "QuantizedRNNCell",
           "QuantizedLSTMCell", "QuantizedGRUCell"]

# Caps the kernel (None: the CPU's best, "avx2", "base"): lets tests run every path on one machine.
_ISA_CAP: Optional[str] = None
_ISA_LEVELS = {"base": 0, "avx2": 1, "vnni": 2}


@functools.cache
def _ops():
    """``torch.ops.rnnfast``, with the extension (which registers the ``quant_*`` operators) loaded. A
    ``quant_rnn`` call whose input or state autograd tracks runs, and a backward through it raises (its
    autograd kernel, csrc/cpu/autograd.cpp): no gradient flows through int8 weights."""
    from . import _C  # noqa: F401

    if not torch.compiler.is_compiling():  # (Dynamo traces this body again; the modules' making ran it first)
        torch.library.register_fake("rnnfast::quant_rnn", _quant_rnn_fake)
        torch.library.register_fake("rnnfast::int8_no_backward", lambda grad, input: input.new_empty(input.shape))
    return torch.ops.rnnfast


def _quant_rnn_fake(mode, x, batch_sizes, h0, c0, params, num_layers, bidirectional, isa):
    """quant_rnn's outputs' shapes (torch.compile traces the int8 modules through it): out (T, B, D * H),
    h_n and c_n shaped like h0 (c_n empty but for LSTM)."""
    torch._check(x.dim() == 3 and h0.dim() == 3, lambda: "rnnfast int8: input and h0 must be 3-D")
    D = 2 if bidirectional else 1
    out = x.new_empty(x.shape[0], x.shape[1], D * h0.shape[2])
    return out, h0.new_empty(h0.shape), h0.new_empty(h0.shape) if mode == MODE_ID["LSTM"] else h0.new_empty(0)


def kernel_isa() -> str:
    """The int8 kernel that runs here: ``"vnni"`` (AVX512-VNNI), ``"avx2"`` or ``"base"`` (x86-64)."""
    cap = -1 if _ISA_CAP is None else _ISA_LEVELS[_ISA_CAP]
    level = _ops().quant_isa(cap)
    return next(name for name, v in _ISA_LEVELS.items() if v == level)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per output row: ``w ~ scale[:, None] * q``, ``q`` in [-127, 127]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _check_eval(module: nn.Module) -> None:
    """A layer whose float twin would apply dropout here raises rather than silently not drop."""
    if module.training and getattr(module, "dropout", 0) > 0 and getattr(module, "num_layers", 1) > 1:
        raise RuntimeError(
            f"{type(module).__name__} is an int8 inference module: in training mode its float twin would apply "
            "dropout; call .eval() on it (or on the model)"
        )


def _under_autocast(input, hx):
    """``(input, hx)`` in float32 where CPU autocast is on: the int8 modules compute in float32 (int8
    products, float32 gates), as autocast runs its float32 ops, so a bfloat16 or float16 input and state
    (a layer before them under autocast) is cast to float32, and the outputs are float32."""
    if not torch.is_autocast_enabled("cpu"):
        return input, hx
    cast = lambda t: t.float() if isinstance(t, Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t  # noqa: E731
    if isinstance(input, PackedSequence):
        input = PackedSequence(cast(input.data), input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    else:
        input = cast(input)
    return input, (tuple(cast(s) for s in hx) if isinstance(hx, (tuple, list)) else cast(hx))


def _check_cpu_float(name: str, input: Tensor) -> None:
    if input.device.type != "cpu":
        raise RuntimeError(f"{name} runs on the CPU only, but the input is on {input.device}")
    if input.dtype != torch.float32:
        raise RuntimeError(f"{name} takes float32 input, got {input.dtype}: convert it with input.float()")


class _Quantized(nn.Module):
    """Shared part of the quantized layers and cells: int8 buffers and their packed copy."""

    mode: str
    num_layers: int = 1
    bidirectional: bool = False

    def _init_weights(self, float_module: nn.Module, names: Iterable[tuple[str, str, str, str]]) -> None:
        """Quantize ``(w_ih, w_hh, b_ih, b_hh)`` named groups of ``float_module`` into buffers."""
        self._groups = list(names)
        for w_ih, w_hh, b_ih, b_hh in self._groups:
            for w in (w_ih, w_hh):
                q, scale = quantize_weight(getattr(float_module, w))
                self.register_buffer(w, q)
                self.register_buffer(w + "_scale", scale)
            if self.bias:
                for b in (b_ih, b_hh):
                    self.register_buffer(b, getattr(float_module, b).detach().float().clone())
        self._repack()

    def _repack(self) -> None:
        """Drop the kernel's packed copy and, with the weights on the CPU, build it now: a first call under
        torch.jit.trace then finds it (packed inside the trace, it would sit in one traced call's graph only,
        and the trace's check fails)."""
        self._packed: Optional[list[Tensor]] = None
        if all(b.device.type == "cpu" for b in self.buffers(recurse=False)):
            self._packed_weights()

    def _packed_weights(self) -> list[Tensor]:
        """The kernel's layout of every layer and direction (4 tensors each), built once."""
        if self._packed is None:
            ops, packed = _ops(), []
            for w_ih, w_hh, b_ih, b_hh in self._groups:
                bias = (getattr(self, b_ih), getattr(self, b_hh)) if self.bias else (None, None)
                packed += ops.quant_pack(getattr(self, w_ih), getattr(self, w_ih + "_scale"), getattr(self, w_hh),
                                         getattr(self, w_hh + "_scale"), *bias, GATES[self.mode])
            self._packed = packed
        return self._packed

    def _run(self, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor]):
        cap = -1 if _ISA_CAP is None else _ISA_LEVELS[_ISA_CAP]
        # torch.ops directly: making or unpickling the module loaded the operators (_ops), whose cache wrapper
        # torch.compile would warn about and trace through
        return torch.ops.rnnfast.quant_rnn(MODE_ID[self.mode], x, batch_sizes, h0, c0, self._packed_weights(),
                                           self.num_layers, self.bidirectional, cap)

    def __setstate__(self, state: dict) -> None:  # unpickling skips __init__: load the operators here
        super().__setstate__(state)
        _ops()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._repack()

    def _apply(self, fn, recurse: bool = True):
        module = super()._apply(fn, recurse)
        self._repack()
        return module

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``, which cannot compile these Python forwards: name what can."""
        raise RuntimeError(
            f"torch.jit.script cannot compile rnnfast's {type(self).__name__}: its forward is Python. "
            "torch.jit.trace records it (the graph calls rnnfast's int8 operators, so it runs where rnnfast is "
            "imported); torch.compile runs it too."
        )


class _QuantizedLayer(_Quantized):
    """An int8 ``RNN``/``LSTM``/``GRU`` with the float layer's forward contract."""

    # torch.nn's own argument checks and repr, which read only the layer's attributes
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    extra_repr_float = nn.RNNBase.extra_repr

    def __init__(self, float_module: nn.RNNBase) -> None:
        super().__init__()
        if float_module.proj_size > 0:
            raise NotImplementedError("rnnfast.quantize_dynamic: LSTM with proj_size > 0 is not supported")
        self.mode = float_module.mode
        for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                     "proj_size"):
            setattr(self, attr, getattr(float_module, attr))
        self.train(float_module.training)
        D = 2 if self.bidirectional else 1
        sfx = [f"_l{layer}{'_reverse' if d else ''}" for layer in range(self.num_layers) for d in range(D)]
        self._init_weights(float_module, [(f"weight_ih{s}", f"weight_hh{s}", f"bias_ih{s}", f"bias_hh{s}")
                                          for s in sfx])

    @property
    def _flat_weights(self) -> list[Tensor]:
        # what torch's check_input compares the input dtype with: the layer computes in float32
        return [self.weight_ih_l0_scale]

    def extra_repr(self) -> str:
        return self.extra_repr_float() + ", dtype=torch.qint8"

    def forward(self, input, hx=None):
        """Same inputs and outputs as the float layer's ``forward`` (inference only)."""
        input, hx = _under_autocast(input, hx)
        fast = self._common_call(input, hx)
        if fast is not None:
            return fast
        lstm = self.mode == "LSTM"
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        data, batch_sizes, sorted_idx, unsorted_idx = input if packed else (input, None, None, None)
        _check_cpu_float(name, data)
        if not packed and input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        batched = packed or input.dim() == 3
        x = data if batched else input.unsqueeze(0 if self.batch_first else 1)
        if not packed and self.batch_first:
            x = x.transpose(0, 1)
        B = int(batch_sizes[0]) if packed else x.size(1)
        D = 2 if self.bidirectional else 1
        if hx is None:
            h0 = x.new_zeros(self.num_layers * D, B, self.hidden_size)
            c0 = h0 if lstm else None
        else:
            h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
            want = 3 if batched else 2
            if h0.dim() != want or (lstm and c0.dim() != want):
                kind = "batched 3-D" if batched else "unbatched 2-D"
                got = f"({h0.dim()}-D, {c0.dim()}-D) tensors" if lstm else f"{h0.dim()}-D tensor"
                raise RuntimeError(f"For {kind} input, {'hx and cx' if lstm else 'hx'} should also be {want}-D "
                                   f"but got {got}")
            if lstm:
                _modules.check_two_states(hx, "lstm")
            if not batched:
                h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
        _check_eval(self)
        check = data if packed else (x.transpose(0, 1) if self.batch_first else x)
        self.check_input(check, batch_sizes)
        self.check_hidden_size(h0, self.get_expected_hidden_size(check, batch_sizes), "Expected hidden size {}, got {}")
        if lstm:
            self.check_hidden_size(c0, self.get_expected_hidden_size(check, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")
        for state, what in ((h0, "hx[0]" if lstm else "hx"), (c0, "hx[1]")):
            if state is not None:
                _modules._check_state(what, state, data)
        if sorted_idx is not None:
            h0 = h0.index_select(1, sorted_idx)
            c0 = None if c0 is None else c0.index_select(1, sorted_idx)
        if packed:
            x, lengths = nn.utils.rnn.pad_packed_sequence(PackedSequence(data, batch_sizes))
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        out, h_n, c_n = self._run(x, batch_sizes, h0, c0)
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if lstm else c_n
        if packed:
            out = nn.utils.rnn.pack_padded_sequence(out, lengths, enforce_sorted=True).data
            return PackedSequence(out, batch_sizes, sorted_idx, unsorted_idx), ((h_n, c_n) if lstm else h_n)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out, h_n, c_n = out.squeeze(0 if self.batch_first else 1), h_n.squeeze(1), c_n.squeeze(1) if lstm else c_n
        return out, ((h_n, c_n) if lstm else h_n)


    def _common_call(self, input, hx):
        """:func:`rnnfast.modules.plain_call` on float32 input with no dropout to refuse (the full path
        raises for it), straight to the kernel."""
        dropout = self.training and self.dropout > 0 and self.num_layers > 1
        if getattr(input, "dtype", None) != torch.float32 or dropout:
            return None
        return _modules.plain_call(self, input, hx, lambda x, h0, c0: self._run(x, None, h0, c0))


class _QuantizedCell(_Quantized):
    """An int8 ``RNNCell``/``LSTMCell``/``GRUCell`` with the float cell's forward contract."""

    extra_repr_float = nn.RNNCellBase.extra_repr

    def __init__(self, float_module: nn.RNNCellBase) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.bias = float_module.input_size, float_module.hidden_size, \
            float_module.bias
        if isinstance(float_module, nn.RNNCell):
            self.nonlinearity = float_module.nonlinearity
            self.mode = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}[self.nonlinearity]
        else:
            self.mode = "LSTM" if isinstance(float_module, nn.LSTMCell) else "GRU"
        self.train(float_module.training)
        self._init_weights(float_module, [("weight_ih", "weight_hh", "bias_ih", "bias_hh")])

    def extra_repr(self) -> str:
        return self.extra_repr_float() + ", dtype=torch.qint8"

    def forward(self, input: Tensor, hx=None):
        """Same inputs and outputs as the float cell's ``forward`` (inference only)."""
        input, hx = _under_autocast(input, hx)
        lstm = self.mode == "LSTM"
        name = type(self).__name__
        _check_cpu_float(name, input)
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if lstm and hx is not None:
            _modules.check_two_states(hx, "lstm_cell")
        states = None if hx is None else ((hx[0], hx[1]) if lstm else (hx,))
        for k, s in enumerate(states or ()):
            if s.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected {f'hx[{k}]' if lstm else 'hidden'} to be 1D or 2D, "
                                 f"got {s.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if states is None:
            zeros = x.new_zeros(x.size(0), self.hidden_size)
            states = (zeros, zeros) if lstm else (zeros,)
        elif not batched:
            states = tuple(s.unsqueeze(0) for s in states)
        _modules.check_cell_sizes(self, x, states)
        _, h, c = self._run(x.unsqueeze(0), None, states[0].unsqueeze(0), states[1].unsqueeze(0) if lstm else None)
        h, c = h[0], c[0] if lstm else None
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0) if lstm else None
        return (h, c) if lstm else h


class QuantizedRNN(_QuantizedLayer):
    """int8 :class:`torch.nn.RNN` (tanh or relu) for inference; built by :func:`quantize_dynamic`."""

    def __init__(self, float_module: nn.RNN) -> None:
        super().__init__(float_module)
        self.nonlinearity = float_module.nonlinearity


class QuantizedLSTM(_QuantizedLayer):
    """int8 :class:`torch.nn.LSTM` for inference; built by :func:`quantize_dynamic`."""

    get_expected_cell_size = nn.LSTM.get_expected_cell_size


class QuantizedGRU(_QuantizedLayer):
    """int8 :class:`torch.nn.GRU` for inference; built by :func:`quantize_dynamic`."""


class QuantizedRNNCell(_QuantizedCell):
    """int8 :class:`torch.nn.RNNCell` for inference; built by :func:`quantize_dynamic`."""


class QuantizedLSTMCell(_QuantizedCell):
    """int8 :class:`torch.nn.LSTMCell` for inference; built by :func:`quantize_dynamic`."""


class QuantizedGRUCell(_QuantizedCell):
    """int8 :class:`torch.nn.GRUCell` for inference; built by :func:`quantize_dynamic`."""


# float class -> quantized class; rnnfast's layers and cells are quantized like their torch.nn twins
_TARGETS: dict[type, type] = {
    nn.RNN: QuantizedRNN,
    nn.LSTM: QuantizedLSTM,
    nn.GRU: QuantizedGRU,
    nn.RNNCell: QuantizedRNNCell,
    nn.LSTMCell: QuantizedLSTMCell,
    nn.GRUCell: QuantizedGRUCell,
}
_TARGETS.update({twin: _TARGETS[base] for base, twin in _modules._SWAPS.items()})
_TWINS = {**_modules._SWAPS, **{twin: base for base, twin in _modules._SWAPS.items()}}


def _parse_spec(qconfig_spec, targets: dict) -> tuple[set[type], set[str]]:
    """The classes and module names a spec selects (a set, list or dict keyed by either, like torch's)."""
    if qconfig_spec is None:
        return set(targets), set()
    classes, names = set(), set()
    for key in qconfig_spec:
        if isinstance(key, str):
            names.add(key)
        elif isinstance(key, type) and key in targets:
            classes |= {key, _TWINS.get(key, key)}
        else:
            raise ValueError(
                f"rnnfast.quantize_dynamic quantizes recurrent layers and cells only, not {key!r}: quantize "
                "other modules (nn.Linear, ...) with torch.ao.quantization.quantize_dynamic (the two compose)")
    return classes, names


def quantize_dynamic(
    model: nn.Module,
    qconfig_spec: Optional[Union[set, list, dict]] = None,
    dtype: torch.dtype = torch.qint8,
    mapping: Optional[dict[type, Callable[[nn.Module], nn.Module]]] = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace the recurrent layers and cells of ``model`` with int8 inference modules.

    Args:
        model: any module; a recurrent layer or cell itself is replaced too
            (unlike torch's, which only swaps children).
        qconfig_spec: which modules to quantize, as in torch: ``None`` (every
            ``RNN``/``LSTM``/``GRU``/``*Cell``, torch.nn or rnnfast), or a set, list
            or dict (values ignored) of those classes and/or qualified module names;
            a name selects the recurrent modules at and below it.
        dtype: ``torch.qint8`` (the only one supported).
        mapping: as in torch, the float classes to swap, each to what makes its
            replacement from the float module (``None``: the recurrent layers and
            cells to the int8 modules here).
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The model with its recurrent modules replaced (see the module docstring
        for what the int8 modules support).
    """
    if dtype != torch.qint8:
        raise NotImplementedError(f"rnnfast.quantize_dynamic supports dtype=torch.qint8 only, got {dtype}")
    if mapping is not None and not isinstance(mapping, dict):
        raise TypeError(f"rnnfast.quantize_dynamic: mapping must be a dict of classes or None, got {mapping!r}")
    targets = _TARGETS if mapping is None else mapping
    classes, names = _parse_spec(qconfig_spec, targets)
    if not inplace:
        model = copy.deepcopy(model)

    def chosen(module: nn.Module, name: str, inherited: bool) -> bool:
        return type(module) in targets and (inherited or type(module) in classes or name in names)

    def walk(module: nn.Module, prefix: str, inherited: bool) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if chosen(child, full, inherited):
                setattr(module, name, targets[type(child)](child))
            else:
                walk(child, full + ".", inherited or full in names)

    if chosen(model, "", "" in names):
        return targets[type(model)](model)
    walk(model, "", "" in names)
    return model
