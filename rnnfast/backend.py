"""Backend registry and the contract every rnnfast backend implements.

A backend receives calls already checked and normalised by the layers in
:mod:`rnnfast.modules`:

* ``x`` is time-major and padded, shape ``(T, B, I)``;
* for packed input the batch is sorted by decreasing length and
  ``batch_sizes`` (int64, CPU, shape ``(T,)``, non-increasing) says how many
  rows are active at each step, exactly as in :class:`PackedSequence`; rows
  past their length must leave the state untouched (their outputs are
  ignored);
* ``h0`` is ``(L * D, B, H_out)`` and, for LSTM, ``c0`` is ``(L * D, B, H)``;
* ``weights`` is the list of the module's current weights in torch's flat order
  (``weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0[, weight_hr_l0], ...``);
* under autocast, ``x`` and ``weights`` are what :meth:`Backend.autocast` returned: on the
  ``cpu`` backend ``x`` may be bfloat16 beside float32 states, and the outputs then take the
  states' dtype.

A backend returns ``(out, h_n, c_n)`` with ``out`` of shape ``(T, B, D * H_out)``
(``c_n`` is ``None`` except for LSTM) and must be differentiable with respect
to ``x``, the states and every weight.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# a mode's integer id, as the Triton kernels and the C++ operators take it, is its index in MODES
MODE_ID = {mode: i for i, mode in enumerate(MODES)}
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
ENV_VAR = "RNNFAST_BACKEND"
# os.environ's own dict (CPython keeps it in step with os.environ's writes) and the variable's key
# there, read without Mapping.get's KeyError path: 0.9 us of every layer and cell call where the
# variable is unset, a tiny call's 4%
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None else None


def env_backend() -> Optional[str]:
    """``RNNFAST_BACKEND`` as set now, or None (torch.compile traces os.environ.get)."""
    if _ENVIRON is None or torch.compiler.is_compiling():
        return os.environ.get(ENV_VAR)
    value = _ENVIRON.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


class RNNSpec(NamedTuple):
    """Static description of one recurrent layer stack call (hashable, cheap to build)."""

    mode: str
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    bidirectional: bool = False
    proj_size: int = 0
    dropout: float = 0.0
    training: bool = False

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def out_size(self) -> int:
        """Size of h_t (the projected size when ``proj_size > 0``)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size


class LayerWeights(NamedTuple):
    """The weights of one layer and direction; absent ones are ``None``."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    w_hr: Optional[Tensor]


def layer_weights(spec: RNNSpec, flat: list[Tensor], layer: int, direction: int) -> LayerWeights:
    """Pick one layer/direction's weights out of torch's flat weight list."""
    per = 2 + (2 if spec.bias else 0) + (1 if spec.proj_size > 0 else 0)
    w = flat[(layer * spec.num_directions + direction) * per:][:per]
    b_ih, b_hh = (w[2], w[3]) if spec.bias else (None, None)
    w_hr = w[-1] if spec.proj_size > 0 else None
    return LayerWeights(w[0], w[1], b_ih, b_hh, w_hr)


def dropout_between_layers(out: Tensor, p: float, batch_sizes: Optional[Tensor]) -> Tensor:
    """Dropout on a layer's output, drawing the same random mask torch.nn does.

    torch applies ``at::dropout`` to the packed data for packed input, so the
    mask is drawn in packed order there too.
    """
    if batch_sizes is None:
        return F.dropout(out, p, True)
    lengths = lengths_from_batch_sizes(batch_sizes)
    packed = torch.nn.utils.rnn.pack_padded_sequence(out, lengths, enforce_sorted=True)
    dropped = F.dropout(packed.data, p, True)
    return torch.nn.utils.rnn.pad_packed_sequence(
        torch.nn.utils.rnn.PackedSequence(dropped, packed.batch_sizes), total_length=out.size(0)
    )[0]


def run_stack(
    spec: RNNSpec,
    x: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Optional[Tensor],
    weights: list[Tensor],
    layer: Callable[[str, Tensor, Tensor, Optional[Tensor], LayerWeights, bool], tuple[Tensor, Tensor, Optional[Tensor]]],
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The stack of a call: ``layer(mode, x, h0, c0, weights, reverse) -> (out, h_n, c_n)`` once per
    layer and direction, directions concatenated on the last dimension, dropout between layers in
    training. ``x`` is padded (T, B, I) with ``batch_sizes`` for packed input, or rows of its own
    (PackedSequence data, ``batch_sizes`` None: every row is a step's row)."""
    D, L = spec.num_directions, spec.num_layers
    hs, cs = [], []
    layer_in = x
    for i in range(L):
        layer_in = layer_in.to(x.dtype)  # a float32 output under autocast feeds bfloat16 products
        outs = []
        for d in range(D):
            k = i * D + d
            out, h_n, c_n = layer(spec.mode, layer_in, h0[k], None if c0 is None else c0[k],
                                  layer_weights(spec, weights, i, d), d == 1)
            outs.append(out)
            hs.append(h_n)
            cs.append(c_n)
        layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if spec.dropout > 0 and spec.training and i < L - 1:
            layer_in = dropout_between_layers(layer_in, spec.dropout, batch_sizes)
    c_n = torch.stack(cs) if c0 is not None else None
    return layer_in, torch.stack(hs), c_n


def lengths_from_batch_sizes(batch_sizes: Tensor) -> Tensor:
    """Per-sequence lengths (decreasing) from per-step batch sizes."""
    rows = torch.arange(int(batch_sizes[0]))
    return (batch_sizes.unsqueeze(0) > rows.unsqueeze(1)).sum(1)


class Backend:
    """Base class: a named implementation of the recurrent layers and cells."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when the backend can run on this machine, else why not."""
        return None

    def unsupported_reason(self, spec: RNNSpec, x: Tensor, packed: bool) -> Optional[str]:
        """``None`` when this call is supported, else why not.

        The answer may depend on ``spec``, ``packed`` and ``x``'s device and
        dtype only (not its shape or values): :func:`resolve` caches it.
        """
        return None

    def autocast(
        self, x: Tensor, weights: list[Tensor], dtype: torch.dtype, products: Optional[torch.dtype]
    ) -> tuple[Tensor, list[Tensor]]:
        """The input and weights of a call that autocast runs in ``dtype``, with its products in
        ``products`` where that is narrower (see ``modules._autocast``). Here: ``x`` as it is (already
        in ``dtype``) and cast copies of the weights (autograd flows back through the cast), the
        products computed in ``dtype``. A backend that packs and caches low-precision copies of the
        weights itself returns them as they are."""
        return x, [w.to(dtype) for w in weights]

    def pad_packed(self, data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """PackedSequence data as the padded (T, B, *) a call runs on, zeros past each row's end, and
        the rows' lengths (None where not formed). Here torch's ``pad_packed_sequence``: autograd and
        torch.compile go through it."""
        return torch.nn.utils.rnn.pad_packed_sequence(torch.nn.utils.rnn.PackedSequence(data, batch_sizes))

    def pack_padded(self, out: Tensor, batch_sizes: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """The PackedSequence data of a padded output: the inverse of :meth:`pad_packed`."""
        if lengths is None:
            lengths = lengths_from_batch_sizes(batch_sizes)
        return torch.nn.utils.rnn.pack_padded_sequence(out, lengths, enforce_sorted=True).data

    def rnn(
        self,
        spec: RNNSpec,
        x: Tensor,
        batch_sizes: Optional[Tensor],
        h0: Tensor,
        c0: Optional[Tensor],
        weights: list[Tensor],
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Run the whole stack: layers, directions and dropout between layers.

        The default runs :meth:`layer` once per layer and direction; backends
        that fuse the stack (decode paths) override this.
        """
        def layer(mode: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w: LayerWeights, reverse: bool):
            return self.layer(mode, x, batch_sizes, h0, c0, w, reverse)

        return run_stack(spec, x, batch_sizes, h0, c0, weights, layer)

    def rnn_packed(
        self,
        spec: RNNSpec,
        data: Tensor,
        batch_sizes: Tensor,
        h0: Tensor,
        c0: Optional[Tensor],
        weights: list[Tensor],
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """:meth:`rnn` on PackedSequence data: ``(output data, h_n, c_n)``. The default pads the data
        (:meth:`pad_packed`), runs :meth:`rnn` and packs the output again."""
        x, lengths = self.pad_packed(data, batch_sizes)
        out, h_n, c_n = self.rnn(spec, x, batch_sizes, h0, c0, weights)
        return self.pack_padded(out, batch_sizes, lengths), h_n, c_n

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
        """One layer, one direction over the whole sequence: ``(out, h_T, c_T)``."""
        raise NotImplementedError(f"backend {self.name!r} implements neither rnn() nor layer()")

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
        """One step of a cell on ``(B, I)`` input: ``(h', c')`` (``c'`` only for LSTM)."""
        raise NotImplementedError(f"backend {self.name!r} has no cell()")


class _FirstOrder(torch.autograd.Function):
    """The identity on a fused backward's gradients, tied to the tensors they were computed from;
    its own derivative raises. Under torch.func.vmap (``jacrev``'s batched cotangents) each sample's
    identity."""

    generate_vmap_rule = True

    @staticmethod
    def forward(backend: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.backend = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"rnnfast {ctx.backend} backend: double backward (create_graph=True) is not "
                                  "supported; use backend='reference'")


def first_order(backend: str, backward: Callable, with_graph: Optional[Callable] = None) -> Callable:
    """A fused backward ``backward(ctx, saved, *grads)`` whose kernels have no derivative of their own;
    ``saved`` is ``ctx.saved_tensors``, unpacked here once (torch.utils.checkpoint refuses a second
    unpacking). It runs without building a graph. When autograd asks for one (create_graph=True,
    torch.func.grad), the gradients come from ``with_graph(ctx, saved, *grads)`` (see
    :func:`layer_grads_with_graph`) where the backend gives one and it returns them (not None); else they come back tied to the saved
    tensors through a node whose derivative raises: a second derivative is exact or fails with a clear
    error, never silently wrong."""

    def run(ctx, *grads):
        saved = ctx.saved_tensors
        anchors = [t for t in saved if t is not None and t.requires_grad]
        if with_graph is not None and torch.is_grad_enabled() and anchors:
            result = with_graph(ctx, saved, *grads)
            if result is not None:
                return result
        with torch.no_grad():
            result = backward(ctx, saved, *grads)
        present = [g for g in result if isinstance(g, Tensor)]
        if not torch.is_grad_enabled() or not anchors or not present:
            return result
        tied = iter(_FirstOrder.apply(backend, len(present), *present, *anchors))
        return tuple(next(tied) if isinstance(g, Tensor) else g for g in result)

    return run


def layer_grads_with_graph(
    backend: str,
    mode: str,
    reverse: bool,
    x: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Optional[Tensor],
    w: LayerWeights,
    grads: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]],
) -> Optional[tuple[Optional[Tensor], ...]]:
    """One layer's gradients w.r.t. ``(x, h0, c0, *w)`` as a graph, for a second derivative: reference's
    loop run again on the same inputs and differentiated with create_graph=True, given the gradients of
    ``(out, h_n, c_n)``. torch.nn's layers take second derivatives (gradient penalties, meta-learning);
    a fused backward's kernels have none of their own, so such a backward costs a reference forward and
    backward, and says so once. None for inputs that need no gradient; None in all where an input is a
    torch.func wrapper whose transform has ended (a function from ``torch.func.vjp`` called after it
    returned, as ``jacrev`` does): the loop would record no graph to it, and its gradient would be lost."""
    inputs = (x, h0, c0, *w)
    if any(t is not None and torch._C._functorch.is_dead_tensor_wrapper(t) for t in inputs):
        return None
    _warn_once(backend, "reference", "double backward: a second derivative runs through the reference loop")
    dtype = h0.dtype  # autocast's calls mix bfloat16 inputs with float32 states: the loop runs in the states'

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(dtype)

    # in the states' dtype whatever autocast the backward is called under, as the fused backward runs
    device = x.device.type
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext()
    with torch.enable_grad(), off:
        outs = get_backend("reference").layer(mode, cast(x), batch_sizes, h0, cast(c0),
                                              LayerWeights(*map(cast, w)), reverse)
        pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        if not pairs or not wanted:
            return tuple(None for _ in inputs)
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                       allow_unused=True))
    return tuple(next(got) if t is not None and t.requires_grad else None for t in inputs)


class BackendFallbackWarning(RuntimeWarning):
    """Issued once per (backend, fallback, reason) when a requested backend cannot run a call."""


_REGISTRY: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
_WARNED: set[tuple[str, str, str]] = set()
_RESOLVED: dict[tuple, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend under ``name``; ``factory`` is called lazily, once."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)
    _RESOLVED.clear()


class UnavailableBackend(Backend):
    """Stands in for a backend whose module failed to import, saying why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> Optional[str]:
        return self._reason


def register_lazy(name: str, module: str, cls: str) -> None:
    """Register a backend class that lives in ``module``, imported on first use.

    A module that fails to import (an extension not built, triton missing)
    leaves the backend registered but unavailable, with the error as reason.
    """

    def factory() -> Backend:
        try:
            return getattr(importlib.import_module(module), cls)()
        except Exception as err:  # an optional dependency or a broken build
            return UnavailableBackend(name, f"{module} failed to load: {type(err).__name__}: {err}")

    register_backend(name, factory)


def registered_backends() -> list[str]:
    """Every registered backend name, usable here or not."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend instance registered as ``name``; ``ValueError`` for unknown names."""
    check_backend_name(name, allow_auto=False)
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def load_backends(requested: str) -> None:
    """Import what a module set to ``requested`` (or ``RNNFAST_BACKEND``) may run on, as the module is
    made: under torch.compile the first call is traced, and Dynamo cannot trace an import. ``auto``:
    the backends of :func:`auto_order` for the CPU, and for CUDA when there is a GPU."""
    names = [env_backend() or requested]
    if names[0] == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        names = [n for d in devices for n in auto_order(torch.device(d))]
    for name in names:
        if name in _REGISTRY:
            get_backend(name)


def check_backend_name(name: object, allow_auto: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` when it is no registered backend."""
    if isinstance(name, str) and (name in _REGISTRY or (allow_auto and name == "auto")):
        return
    valid = registered_backends() + (["auto"] if allow_auto else [])
    raise ValueError(f"unknown rnnfast backend {name!r}; expected one of {valid}")


def available_backends() -> list[str]:
    """The backend names that can run on this machine (``reference`` always)."""
    return [n for n in registered_backends() if get_backend(n).unavailable_reason() is None]


def auto_order(device: torch.device) -> list[str]:
    """Backends ``auto`` tries for a device, fastest first."""
    if device.type == "cuda":
        return ["triton", "cuda", "reference"]
    return ["cpu", "reference"]


def _warn_once(requested: str, chosen: str, why: str) -> None:
    key = (requested, chosen, why)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"rnnfast: backend {requested!r} cannot run this call ({why}); falling back to {chosen!r}",
            BackendFallbackWarning,
            stacklevel=4,
        )


def resolve(requested: str, spec: RNNSpec, x: Tensor, packed: bool) -> Backend:
    """Choose the backend that runs a call.

    ``RNNFAST_BACKEND`` overrides ``requested``. ``auto`` takes the first
    backend of :func:`auto_order` that can run the call. An explicit backend
    that cannot run it falls back to ``reference`` with a one-time warning
    naming both. Choices are cached per (backend, spec, device, dtype, packed).
    Inside a forward-mode AD dual level every call runs ``reference`` (torch ops,
    which carry tangents; the fused kernels have no forward derivative), with a
    one-time warning, rather than drop or refuse the tangents.
    """
    requested = env_backend() or requested
    if forward_ad._current_level >= 0 and requested != "reference":
        _warn_once(requested, "reference", "forward-mode AD: only the reference backend has forward derivatives")
        return get_backend("reference")
    key = (requested, spec, x.device, x.dtype, packed)
    chosen = _RESOLVED.get(key)
    if chosen is None:
        check_backend_name(requested)
        chosen = _RESOLVED[key] = _choose(requested, spec, x, packed)
    return chosen


def _choose(requested: str, spec: RNNSpec, x: Tensor, packed: bool) -> Backend:
    if requested == "auto":
        for name in auto_order(x.device):
            if name not in _REGISTRY:
                continue
            b = get_backend(name)
            if b.unavailable_reason() is None and b.unsupported_reason(spec, x, packed) is None:
                return b
        return get_backend("reference")
    b = get_backend(requested)
    why = b.unavailable_reason() or b.unsupported_reason(spec, x, packed)
    if why is None:
        return b
    _warn_once(requested, "reference", why)
    return get_backend("reference")
