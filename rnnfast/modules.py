"""Drop-in replacements for torch.nn's recurrent layers and cells.

Each class subclasses its ``torch.nn`` twin, so constructor arguments,
parameter names, initialisation, ``state_dict`` and ``isinstance`` checks are
torch's own. Only ``forward`` differs: it checks and normalises the call the
way torch does, then hands it to a backend (see :mod:`rnnfast.backend`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .backend import Backend, RNNSpec, check_backend_name, load_backends, resolve
from .export import capturing, check_onnx_exportable, torch_twin

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "convert"]


class _BackendChoice:
    """The ``backend`` attribute shared by layers and cells, validated on assignment."""

    _backend: str = "auto"

    @property
    def backend(self) -> str:
        """Backend name for this module (``"auto"``, ``"reference"``, ``"cpu"``, ...)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend_name(name)
        self.__dict__["_backend"] = name
        load_backends(name)

    def __setstate__(self, state: dict) -> None:  # unpickling and deepcopy skip the setter
        super().__setstate__(state)
        load_backends(self._backend)

    def _backend_repr(self) -> str:
        return "" if self._backend == "auto" else f", backend={self._backend!r}"

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: it compiles the torch.nn twin (see ``rnnfast.export.torch_twin``)."""
        return torch_twin(self)


def _check_state(name: str, state: Tensor, input: Tensor) -> None:
    if state.dtype != input.dtype:
        raise RuntimeError(f"{name} has dtype {state.dtype}, but the input has dtype {input.dtype}")
    if state.device != input.device:
        raise RuntimeError(f"{name} is on {state.device}, but the input is on {input.device}")


def _check_batch_sizes(batch_sizes: Tensor, zero_state: bool) -> None:
    """A PackedSequence's batch_sizes as torch.nn takes them: 1-D int64 (what pack_padded_sequence makes).
    torch.nn sizes its zero state by batch_sizes[0] (TypeError for a float or a row), and aten's op takes
    int64 alone (RuntimeError)."""
    if batch_sizes.dtype == torch.int64 and batch_sizes.dim() == 1:
        return
    odd_size = batch_sizes.dim() != 1 or batch_sizes.is_floating_point() or batch_sizes.is_complex()
    raise (TypeError if zero_state and odd_size else RuntimeError)(
        f"a PackedSequence's batch_sizes must be a 1-D int64 tensor (as pack_padded_sequence makes), got a "
        f"{batch_sizes.dim()}-D {batch_sizes.dtype} tensor")


def check_two_states(hx, op: str) -> None:
    """An LSTM's ``hx`` holds exactly (h, c): torch's ``op`` (``lstm``, ``lstm_cell``) raises for any other
    count, after its own checks have read the first two."""
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states")


def _autocast(mode: str, cell: bool, input, hx, proj: bool = False):
    """Cast a call's input and states the way torch.nn's op is under autocast: ``(input, hx, dtype,
    products)``.

    ``dtype`` is what the call's states and outputs are in (``None`` when autocast is off or leaves
    it alone); the input and weights follow it, or ``products``, through :func:`_cast_weights`.
    CPU autocast casts oneDNN's LSTM layer (padded input, or packed of equal lengths, without
    projections, where aten takes it: :func:`_onednn_lstm`) whole, and torch's RNN and RNNCell compute in
    the products' dtype; the other ops (GRU, other packed or projected LSTM, LSTMCell, GRUCell) run only
    their products in it and their state update in the promotion of the two (float32 for float32
    states): ``products`` is then autocast's dtype where it differs from ``dtype``, else ``None``. With
    projections the output is the projection's product, in autocast's dtype (see the layers' forward).
    CUDA autocast casts every recurrent op. Autocast leaves float64, integer and complex tensors alone:
    such a state, weight or input beside another raises, as torch.nn's products of mixed dtypes do.
    """
    x = input.data if isinstance(input, PackedSequence) else input
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device) or x.dtype == torch.float64:
        return input, hx, None, None
    dtype = products = torch.get_autocast_dtype(device)
    packed = isinstance(input, PackedSequence)
    states = () if hx is None else (tuple(hx) if mode == "LSTM" else (hx,))
    _refuse_uncast((x, *states), dtype)
    whole = mode.startswith("RNN") or (mode == "LSTM" and not cell and (
        proj or ((not packed or _equal_lengths(input.batch_sizes)) and _onednn_lstm(x))))
    if device == "cpu" and not whole:
        dtype = torch.promote_types(dtype, (states[-1] if states else x).dtype)  # what the update reads
    cast = lambda t: t if t.dtype == dtype else t.to(dtype)  # noqa: E731 (a no-op .to costs 1 us)
    hx = None if hx is None else (tuple(cast(s) for s in hx) if mode == "LSTM" else cast(hx))
    return input.to(dtype) if packed else cast(input), hx, dtype, products if products != dtype else None


def _equal_lengths(batch_sizes: Tensor) -> bool:
    """Whether a PackedSequence's sequences (batch_sizes as :func:`_check_batch_sizes` takes them) all have
    one length: aten's LSTM then runs it as padded input (on oneDNN, where it takes the input)."""
    return batch_sizes.numel() > 0 and int(batch_sizes[-1]) == int(batch_sizes[0])


def _onednn_fp16() -> bool:
    """Whether oneDNN has float16 on this CPU (False where torch's build has no such query)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


# whether torch has oneDNN, and oneDNN float16 on this CPU: read once (torch.compile traces neither call)
_ONEDNN = torch.backends.mkldnn.is_available()
_ONEDNN_FP16 = _ONEDNN and _onednn_fp16()


def _onednn_lstm(x: Tensor) -> bool:
    """Whether aten's CPU LSTM runs oneDNN's layer (the op CPU autocast casts whole) on this input:
    float32 and bfloat16 with oneDNN on (bfloat16 as on the CPUs where oneDNN has it, on every CPU),
    float16 only without autograd and with oneDNN's float16."""
    if not _ONEDNN or not torch.backends.mkldnn.enabled:
        return False
    if x.dtype == torch.float16:
        return not torch.is_grad_enabled() and _ONEDNN_FP16
    return x.dtype in (torch.float32, torch.bfloat16)


def _refuse_uncast(tensors, dtype: torch.dtype) -> None:
    """Autocast casts a call's float32, float16 and bfloat16 tensors to ``dtype`` and leaves the others
    alone (float64, integer, bool, complex): torch.nn's products then mix dtypes and raise, here with the
    reason."""
    for t in tensors:
        if t is not None and (t.dtype == torch.float64 or not t.is_floating_point()):
            raise RuntimeError(f"mat1 and mat2 must have the same dtype: autocast casts the call's float32, float16 "
                               f"and bfloat16 tensors to {dtype} and leaves a {t.dtype} input, state or weight alone")


def _cast_weights(backend: Backend, x: Tensor, weights: list[Optional[Tensor]], dtype: torch.dtype,
                  products: Optional[torch.dtype]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """A call's input and weights (None for those absent) as ``backend`` runs them under autocast."""
    present = [w for w in weights if w is not None]
    _refuse_uncast(present, products or dtype)
    x, present = backend.autocast(x, present, dtype, products)
    return x, present + [None] * (len(weights) - len(present))


class _AutocastOff:
    """``torch.autocast(device, enabled=False)``'s switch alone (1.1 us against its 3.7 here, which a cell's
    step feels): the dtype, cache and nesting it also sets matter only where autocast stays on."""

    __slots__ = ("device", "was")

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> None:
        self.was = torch.is_autocast_enabled(self.device)
        torch.set_autocast_enabled(self.device, False)

    def __exit__(self, *exc) -> None:
        torch.set_autocast_enabled(self.device, self.was)


def _policy_applied(autocast_dtype: Optional[torch.dtype], device: str):
    """Autocast off while a backend runs a call that :func:`_autocast` has cast: the backend's own
    torch ops would otherwise cast again (mixing dtypes)."""
    return _AutocastOff(device) if autocast_dtype is not None else contextlib.nullcontext()


def plain_call(layer: nn.Module, input, hx, run: Callable):
    """A layer's common call (a 3-D CPU tensor of the layer's input size, ``hx`` None, a tensor, or for
    LSTM a tuple of two, each on the CPU in the input's dtype and shaped (layers * directions, B, hidden))
    through ``run(x, h0, c0) -> (out, h_n, c_n)`` on time-major ``x``, or None where ``run`` declines it
    (returns None). A decode step is short enough for the full forward's Python to cost 20-60% of it:
    its work is cheap, but it runs with its code and data evicted from the cache by the step's weights.
    None for anything else: the full forward checks it and raises as torch.nn does."""
    if type(input) is not Tensor or input.dim() != 3 or not input.is_cpu:
        return None
    x = input.transpose(0, 1) if layer.batch_first else input
    if x.size(0) == 0 or x.size(2) != layer.input_size:
        return None
    lstm = layer.mode == "LSTM"
    shape = (layer.num_layers * (2 if layer.bidirectional else 1), x.size(1), layer.hidden_size)
    if hx is None:
        states = (x.new_zeros(shape), x.new_zeros(shape) if lstm else None)
    elif lstm and (type(hx) is not tuple or len(hx) != 2):
        return None
    else:
        states = hx if lstm else (hx, None)
        for s in states[:2 if lstm else 1]:
            if type(s) is not Tensor or s.shape != shape or s.dtype != x.dtype or not s.is_cpu:
                return None
    result = run(x, *states)
    if result is None:
        return None
    out, h_n, c_n = result
    return (out.transpose(0, 1) if layer.batch_first else out), ((h_n, c_n) if lstm else h_n)


def _read_weights(module: nn.Module, names: Iterable[str]) -> list[Optional[Tensor]]:
    """The named weights, from the parameter dict where they are plain parameters (a module attribute
    miss, torch's __getattr__, took 0.65 us a weight: 2.6 of a 19 us RNNCell step at B1 H8), else by
    attribute: parametrizations, pruning and the old weight_norm put other tensors there."""
    params = module._parameters
    return [params[n] if n in params else getattr(module, n) for n in names]


class _RNNLayer(_BackendChoice):
    """Shared forward of RNN, LSTM and GRU (mixed in before the torch.nn class)."""

    def extra_repr(self) -> str:
        return super().extra_repr() + self._backend_repr()

    def _spec(self) -> RNNSpec:
        # positional: 0.6 us less a call than by keyword
        return RNNSpec(self.mode, self.input_size, self.hidden_size, self.num_layers, self.bias, self.bidirectional,
                       self.proj_size, self.dropout, self.training)

    def _weights(self) -> list[Tensor]:
        """The current weights in torch's flat order, also when replaced or under ``functional_call``.

        Read straight from the parameter dict: cheaper per call than torch's
        ``_update_flat_weights``, which matters for one-step decoding.
        """
        # parametrized (torch.nn.utils.parametrize.is_parametrized without its getattr miss, every call):
        # torch's own reads, so that a stateful parametrization (spectral_norm's power iteration) steps
        # once per read, as often as with torch.nn
        if "parametrizations" in self._modules:
            self._update_flat_weights()
            return list(self._flat_weights)
        return _read_weights(self, self._flat_weights_names)

    def resolved_backend(self, input: Union[Tensor, PackedSequence]) -> str:
        """Name of the backend a call on ``input`` runs on here, after ``auto`` and fallbacks."""
        packed = isinstance(input, PackedSequence)
        return resolve(self._backend, self._spec(), input.data if packed else input, packed).name

    def _zero_state(self, input: Tensor, batch: int) -> tuple[Tensor, Optional[Tensor]]:
        D = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        h0 = torch.zeros(self.num_layers * D, batch, out_size, dtype=input.dtype, device=input.device)
        if self.mode != "LSTM":
            return h0, None
        c0 = torch.zeros(self.num_layers * D, batch, self.hidden_size, dtype=input.dtype, device=input.device)
        return h0, c0

    def _split_state(self, hx, want_dim: int, batched: bool,
                     packed: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Unpack ``hx`` into ``(h0, c0)`` and check its rank the way torch does (on a PackedSequence,
        torch.nn's LSTM leaves it to aten, whose indexing raises IndexError for fewer dimensions)."""
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if self.mode == "LSTM":
            h0, c0 = hx[0], hx[1]
            if h0.dim() != want_dim or c0.dim() != want_dim:
                error = IndexError if packed and min(h0.dim(), c0.dim()) < want_dim else RuntimeError
                raise error(
                    f"For {kind} input, hx and cx should also be {want_dim}-D "
                    f"but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
            check_two_states(hx, "lstm")
            return h0, c0
        if hx.dim() != want_dim:
            raise RuntimeError(f"For {kind} input, hx should also be {want_dim}-D but got {hx.dim()}-D tensor")
        return hx, None

    def _packed_hx(self, hx, permuted: bool):
        """A PackedSequence call's ``hx`` as torch.nn's forward hands it on, raising what it raises: unsorted
        sequences permute it (an LSTM's first two states; indexing dimension 1), and an LSTM's sorted ones go
        to aten's ``lstm`` binding as they are (a tuple of two tensors)."""
        if self.mode != "LSTM":
            if permuted and isinstance(hx, Tensor) and hx.dim() < 2:
                raise IndexError(f"Dimension out of range (expected to be in range of [-1, 0], but got 1): "
                                 f"hx has {hx.dim()} dimension")
            return hx
        if permuted:
            return hx[0], hx[1]
        sequence = isinstance(hx, (tuple, list))
        if not sequence or not all(isinstance(s, Tensor) for s in hx):
            what = type(hx).__name__ + (" of other types" if sequence else "")
            raise TypeError(f"lstm(): argument 'hx' must be a tuple of Tensors, not {what}")
        check_two_states(hx, "lstm")
        return hx
        return hx

    def _packed_lstm_dtypes(self, data: Tensor, batch_sizes: Tensor, c0: Tensor) -> Tensor:
        """torch.nn's LSTM leaves a PackedSequence's checks to aten: input of another dtype than the weights
        raises aten's RuntimeError, and a c0 of a narrower float type is widened by the first update (as
        here, up front), but where aten runs sequences of equal lengths on oneDNN, which refuses it."""
        weight_dtype = self._flat_weights[0].dtype
        if data.dtype != weight_dtype:
            raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {data.dtype} (a PackedSequence's "
                               f"data) and {weight_dtype} (the weights)")
        narrower = c0.is_floating_point() and torch.promote_types(c0.dtype, data.dtype) == data.dtype
        if c0.dtype == data.dtype or not narrower:
            return c0
        if _equal_lengths(batch_sizes) and _onednn_lstm(data):
            raise RuntimeError(f"hx[1] has dtype {c0.dtype}, but the input has dtype {data.dtype}: torch.nn runs "
                               "sequences of equal lengths on oneDNN, which takes no c0 of another dtype")
        return c0.to(data.dtype)

    def forward(self, input, hx=None):
        """Same inputs and outputs as the torch.nn layer's ``forward``."""
        if capturing():  # ONNX export, torch.export, jit.trace record torch.nn's graph (see rnnfast.export)
            check_onnx_exportable(self)
            return super().forward(input, hx)
        plain = self._plain_call(input, hx)
        if plain is not None:
            return plain
        is_lstm = self.mode == "LSTM"
        given = input, hx
        if isinstance(input, PackedSequence):
            _check_batch_sizes(input.batch_sizes, hx is None)
        input, hx, autocast_dtype, products = _autocast(self.mode, False, input, hx, self.proj_size > 0)
        packed = isinstance(input, PackedSequence)
        batched = True
        sorted_indices = unsorted_indices = batch_sizes = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            h0, c0 = (self._zero_state(data, int(batch_sizes[0])) if hx is None
                      else self._split_state(self._packed_hx(hx, sorted_indices is not None), 3, True, packed=True))
            check_input = data
            if is_lstm and autocast_dtype is None:
                c0 = self._packed_lstm_dtypes(data, batch_sizes, c0)
        else:
            if input.dim() not in (2, 3):
                kind = "RNN" if self.mode.startswith("RNN") else self.mode
                what = "D tensor" if kind == "RNN" else "D"  # torch.nn's RNN words it differently from LSTM/GRU
                raise ValueError(f"{kind}: Expected input to be 2D or 3D, got {input.dim()}{what} instead")
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            batch = input.size(0 if self.batch_first else 1)
            if hx is None:
                h0, c0 = self._zero_state(input, batch)
            else:
                h0, c0 = self._split_state(hx, 3 if batched else 2, batched)
                if not batched:
                    h0 = h0.unsqueeze(1)
                    c0 = None if c0 is None else c0.unsqueeze(1)
            check_input = input
        # torch's own checks: dtype, input rank and size, state shapes
        self.check_forward_args(check_input, (h0, c0) if is_lstm else h0, batch_sizes)
        _check_state("hx[0]" if is_lstm else "hx", h0, check_input)
        if c0 is not None:
            _check_state("hx[1]", c0, check_input)
        if sorted_indices is not None and hx is not None:  # zeros need no reordering
            h0 = h0.index_select(1, sorted_indices)
            c0 = None if c0 is None else c0.index_select(1, sorted_indices)

        spec = self._spec()
        backend = resolve(self._backend, spec, data if packed else input, packed)
        x = data if packed else (input.transpose(0, 1) if self.batch_first else input)
        if (batch_sizes.numel() if packed else x.size(0)) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        weights = self._weights()
        if autocast_dtype is not None:
            x, weights = _cast_weights(backend, x, weights, autocast_dtype, products)
        with _policy_applied(autocast_dtype, x.device.type):
            if packed:
                out, h_n, c_n = backend.rnn_packed(spec, x, batch_sizes, h0, c0, weights)
            else:
                out, h_n, c_n = backend.rnn(spec, x, None, h0, c0, weights)
        if autocast_dtype is not None and self.proj_size > 0 and x.device.type == "cpu":
            # torch's CPU LSTM with projections (padded or packed) updates its cell state in the promotion of
            # autocast's dtype and c0's (a PackedSequence's data: a tensor's .data raises under torch.func)
            c0_given = given[1][1] if given[1] is not None else given[0]
            c0_given = c0_given.data if isinstance(c0_given, PackedSequence) else c0_given
            c_n = c_n.to(torch.promote_types(autocast_dtype, c0_given.dtype))

        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = None if c_n is None else c_n.index_select(1, unsorted_indices)
        hidden = (h_n, c_n) if is_lstm else h_n
        if packed:
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), hidden
        if self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return out, hidden


    def _plain_call(self, input, hx):
        """:func:`plain_call` without autocast or projection, straight to the backend."""
        if self.proj_size > 0 or torch.is_autocast_enabled("cpu"):
            return None

        def run(x: Tensor, h0: Tensor, c0: Optional[Tensor]):
            weights = self._weights()
            if x.dtype != weights[0].dtype:
                return None
            spec = self._spec()
            return resolve(self._backend, spec, x, False).rnn(spec, x, None, h0, c0, weights)

        return plain_call(self, input, hx, run)


class RNN(_RNNLayer, nn.RNN):
    """Elman RNN (tanh or relu), a drop-in for :class:`torch.nn.RNN` with ``backend=``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class LSTM(_RNNLayer, nn.LSTM):
    """LSTM, a drop-in for :class:`torch.nn.LSTM` with ``backend=``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class GRU(_RNNLayer, nn.GRU):
    """GRU, a drop-in for :class:`torch.nn.GRU` with ``backend=``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _Cell(_BackendChoice):
    """Shared forward of the three cells (mixed in before the torch.nn class)."""

    def extra_repr(self) -> str:
        return super().extra_repr() + self._backend_repr()

    def _mode(self) -> str:
        if isinstance(self, nn.LSTMCell):
            return "LSTM"
        if isinstance(self, nn.GRUCell):
            return "GRU"
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"

    def _spec(self) -> RNNSpec:
        """The cell's spec, rebuilt only when an attribute it comes from changes (a step is short)."""
        key = (self.input_size, self.hidden_size, self.bias, self.__dict__.get("nonlinearity"))
        cached = self.__dict__.get("_spec_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_spec_cache"] = (key, RNNSpec(mode=self._mode(), input_size=self.input_size,
                                                                  hidden_size=self.hidden_size, bias=self.bias))
        return cached[1]

    def _weights(self) -> list[Optional[Tensor]]:
        """weight_ih, weight_hh, bias_ih, bias_hh, each read once as torch's cells read them (a
        parametrized weight, no longer in the parameter dict, through its parametrization)."""
        return _read_weights(self, _CELL_WEIGHTS)

    def forward(self, input: Tensor, hx=None):
        """Same inputs and outputs as the torch.nn cell's ``forward``."""
        if capturing():  # as for the layers
            return super().forward(input, hx)
        plain = self._plain_step(input, hx)
        if plain is not None:
            return plain
        spec = self._spec()
        mode = spec.mode
        name = type(self).__name__
        # torch.nn's checks in its order: ranks (every state an LSTMCell's hx holds), then its op's binding
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for k, s in enumerate(hx if mode == "LSTM" else (hx,)):
                if s.dim() not in (1, 2):
                    what = f"hx[{k}]" if mode == "LSTM" else "hidden"
                    raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
            if mode == "LSTM" and input.dim() == 2:  # unbatched, torch.nn takes hx[0] and hx[1] of any sequence
                if not isinstance(hx, (tuple, list)):
                    raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
                                    f"not {type(hx).__name__}")
                check_two_states(hx, "lstm_cell")
            elif mode == "LSTM" and len(hx) < 2:
                raise IndexError(f"LSTMCell: an unbatched call's hx holds (h, c), got {len(hx)} state")
        input, hx, autocast_dtype, products = _autocast(mode, True, input, hx)
        states = None if hx is None else ((hx[0], hx[1]) if mode == "LSTM" else (hx,))
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            states = None if states is None else tuple(s.unsqueeze(0) for s in states)
        if states is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = (zeros, zeros) if mode == "LSTM" else (zeros,)
        weights = self._weights()
        self._check_step(input, states, weights[0].dtype, autocast_dtype is not None)

        h, c = self._step(spec, input, states, weights, autocast_dtype, products)
        if not batched:
            h = h.squeeze(0)
            c = None if c is None else c.squeeze(0)
        return (h, c) if mode == "LSTM" else h

    def _plain_step(self, input, hx):
        """The common call straight to the backend, or None for anything else (the full forward then
        checks it and raises as torch.nn does): a 2-D CPU tensor of the cell's input size, hx None, a
        tensor, or for LSTMCell a tuple of two, each (B, hidden) on the CPU in the input's dtype once
        autocast has cast them, the weights in that dtype or autocast on. A cell's step is short: the
        full forward's casts and checks cost about as much Python as a B8 H256 step's products take."""
        if type(input) is not Tensor or input.ndim != 2 or not input.is_cpu or input.shape[1] != self.input_size:
            return None
        spec = self._spec()
        mode = spec.mode
        lstm = mode == "LSTM"
        if hx is not None:
            if lstm and (type(hx) is not tuple or len(hx) != 2 or type(hx[0]) is not Tensor
                         or type(hx[1]) is not Tensor):
                return None
            if not lstm and type(hx) is not Tensor:
                return None
        autocast_dtype = products = None
        if torch.is_autocast_enabled("cpu"):
            input, hx, autocast_dtype, products = _autocast(mode, True, input, hx)
        shape = (input.shape[0], self.hidden_size)
        if hx is None:
            zeros = input.new_zeros(shape)
            states = (zeros, zeros) if lstm else (zeros,)
        else:
            states = hx if lstm else (hx,)
        for s in states:
            if s.shape != shape or s.dtype != input.dtype or not s.is_cpu:
                return None
        weights = self._weights()
        if autocast_dtype is None and weights[0].dtype != input.dtype:  # torch.nn's error (no second weights read)
            self._check_step(input, states, weights[0].dtype, False)
        h, c = self._step(spec, input, states, weights, autocast_dtype, products)
        return (h, c) if lstm else h

    def _step(self, spec: RNNSpec, input: Tensor, states: tuple[Tensor, ...], weights: list[Optional[Tensor]],
              autocast_dtype: Optional[torch.dtype],
              products: Optional[torch.dtype]) -> tuple[Tensor, Optional[Tensor]]:
        """One checked step on the resolved backend, its input and weights cast as :func:`_autocast` says."""
        backend = resolve(self._backend, spec, input, False)
        c = states[-1] if spec.mode == "LSTM" else None
        if autocast_dtype is None:  # a step is short: no context to enter
            return backend.cell(spec.mode, input, states[0], c, *weights)
        input, weights = _cast_weights(backend, input, weights, autocast_dtype, products)
        with _policy_applied(autocast_dtype, input.device.type):
            return backend.cell(spec.mode, input, states[0], c, *weights)

    def _check_step(self, input: Tensor, states: tuple[Tensor, ...], weight_dtype: torch.dtype,
                    autocast: bool) -> None:
        """The checks torch's fused cell ops make, with the same exception types."""
        if input.dtype != weight_dtype and not autocast:
            raise RuntimeError(
                f"{type(self).__name__}: input dtype ({input.dtype}) does not match weight dtype ({weight_dtype})")
        check_cell_sizes(self, input, states)


def check_cell_sizes(cell: nn.Module, input: Tensor, states: tuple[Tensor, ...]) -> None:
    """torch's fused cell ops' size and device checks of a batched step, with their exception types."""
    if input.size(1) != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}")
    for k, s in enumerate(states):
        if s.size(0) != input.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{k} batch size {s.size(0)}")
        if s.size(1) != cell.hidden_size:
            raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {s.size(1)}, expected {cell.hidden_size}")
        _check_state(f"hidden{k}", s, input)


class RNNCell(_Cell, nn.RNNCell):
    """Elman RNN cell, a drop-in for :class:`torch.nn.RNNCell` with ``backend=``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class LSTMCell(_Cell, nn.LSTMCell):
    """LSTM cell, a drop-in for :class:`torch.nn.LSTMCell` with ``backend=``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


class GRUCell(_Cell, nn.GRUCell):
    """GRU cell, a drop-in for :class:`torch.nn.GRUCell` with ``backend=``."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend


_SWAPS: dict[type, type] = {
    nn.RNN: RNN,
    nn.LSTM: LSTM,
    nn.GRU: GRU,
    nn.RNNCell: RNNCell,
    nn.LSTMCell: LSTMCell,
    nn.GRUCell: GRUCell,
}


_PARAMETRIZED: dict[type, type] = {}


def _twin(cls: type) -> Optional[type]:
    """The rnnfast class for a torch.nn class, or for the class torch.nn.utils.parametrize makes over
    one (``Parametrized<Name>``: properties for the parametrized tensors): the same over the twin."""
    if cls in _SWAPS:
        return _SWAPS[cls]
    base = cls.__bases__[0] if len(cls.__bases__) == 1 else None
    if base not in _SWAPS or cls.__name__ != f"Parametrized{base.__name__}":
        return None
    if cls not in _PARAMETRIZED:
        attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        _PARAMETRIZED[cls] = type(cls.__name__, (_SWAPS[base],), attrs)
    return _PARAMETRIZED[cls]


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Turn every torch.nn recurrent layer and cell in ``model`` into its rnnfast twin, in place.

    Each module keeps its identity, parameters (same tensors, same names),
    hooks, parametrizations and mode: only its class changes, so optimizers and
    references held elsewhere stay valid. Modules already converted get
    ``backend``. Subclasses of the torch classes (which may override ``forward``)
    are left alone. Returns ``model``.
    """
    check_backend_name(backend)
    for module in model.modules():
        target = _twin(type(module))
        if target is not None:
            module.__class__ = target
        if isinstance(module, _BackendChoice):
            module.backend = backend
    return model

