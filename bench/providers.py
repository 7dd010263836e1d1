"""Providers: the implementations a case is timed on (torch.nn, every rnnfast backend, peers).

A provider builds, from a case and torch.nn's float32 layer (whose weights every
provider that can take them copies), a ``step`` closure running one measured unit
of work and returning its output. A provider that cannot be installed here says
why (:meth:`Provider.unavailable`); one that cannot run a case raises
:class:`Unsupported` with the reason; both land in the results, never dropped.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

import rnnfast
from rnnfast.backend import get_backend

from .cases import Case

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INFERENCE = ("fwd", "decode")
# written by `python -m bench.peers install` on the GPU machine: why a peer did not install
PEERS_STATUS = os.path.join(os.path.dirname(__file__), "peers", "status.json")


class Unsupported(Exception):
    """A provider cannot run this case (the message says why)."""


@dataclass
class Built:
    """A provider's closure for one case, and what actually ran (backend, kernel) when known."""

    step: Callable[[], Any]
    ran_on: str = ""
    first: Any = None  # the first call's output when building already made it (the step carries state)


@dataclass
class Inputs:
    """A case's float32 tensors on the bench device: input and output gradient."""

    x: Tensor
    grad_out: Tensor


def module_step(module: nn.Module, case: Case, inputs: Inputs, dtype: torch.dtype,
                context: Callable[[], ContextManager] = contextlib.nullcontext) -> Callable[[], Tensor]:
    """One unit of ``case`` on a module with torch.nn's call convention, under ``context``.

    fwd: a forward without autograd; fwdbwd: forward and backward from a fixed output
    gradient; decode: one step from the previous step's state (zeros on the first). A cell
    steps through x in a Python loop, its output the states stacked.
    """
    x = inputs.x.to(dtype)
    call = _stepping(module) if case.cell else module
    if case.mode == "decode":
        state: list = [None]

        def decode() -> Tensor:
            with torch.no_grad(), context():
                out, state[0] = call(x, state[0])
            return out

        return decode
    if case.mode == "fwd":
        def fwd() -> Tensor:
            with torch.no_grad(), context():
                return call(x)[0]

        return fwd
    xg = x.clone().requires_grad_()
    params = [p for p in module.parameters() if p.requires_grad]
    grads: dict = {}

    def fwdbwd() -> Tensor:
        for p in params:
            p.grad = None
        xg.grad = None
        with context():
            out = call(xg)[0]
        if out.dtype not in grads:  # the output dtype depends on the provider (autocast): cast once
            grads[out.dtype] = inputs.grad_out.to(out.dtype)
        out.backward(grads[out.dtype])
        return out

    return fwdbwd


def _stepping(cell: nn.Module) -> Callable:
    """A cell as a layer: ``(x, None) -> (the states stacked, last state)``, one call a step."""

    def run(x: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        outs = []
        for x_t in x:
            hx = cell(x_t, hx)
            outs.append(hx[0] if isinstance(hx, tuple) else hx)
        return torch.stack(outs), hx

    return run


class Provider:
    """Base class; subclasses set ``name`` and ``what`` and implement :meth:`build`."""

    name = ""
    what = ""  # one line for the report
    dtypes: tuple = ("float32", "bfloat16")
    modes: tuple = ("fwd", "fwdbwd", "decode")
    cells = True  # whether it runs the cells' cases

    def applies(self, case: Case) -> bool:
        """Whether the case is in this provider's scope by design (no row at all when not)."""
        return case.dtype in self.dtypes and case.mode in self.modes and (self.cells or not case.cell)

    def unavailable(self) -> Optional[str]:
        """``None`` when the provider can run here, else why not (reported once per run)."""
        return None

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        """The step closure for ``case``; raises :class:`Unsupported` when it cannot run it."""
        raise NotImplementedError


class TorchNN(Provider):
    name = "torch"
    what = "torch.nn, the module cast to the case dtype (`.to(dtype)`); cuDNN on GPU"

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        dtype = DTYPE[case.dtype]
        m = copy.deepcopy(ref).to(dtype)
        ran_on = "cuDNN" if inputs.x.is_cuda and torch.backends.cudnn.enabled else "aten"
        return Built(module_step(m, case, inputs, dtype), ran_on)


def _autocast(device: str) -> Callable[[], ContextManager]:
    return lambda: torch.autocast(device, dtype=torch.bfloat16)


class TorchAutocast(Provider):
    name = "torch-autocast"
    what = "torch.nn, float32 module under `torch.autocast(dtype=torch.bfloat16)`"
    dtypes = ("bfloat16",)

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        m = copy.deepcopy(ref)
        return Built(module_step(m, case, inputs, torch.float32, _autocast(inputs.x.device.type)), "aten (autocast)")


def _quantized(quantize_dynamic: Callable, ref: nn.Module, *spec: Any) -> nn.Module:
    """A copy of ``ref`` quantized to int8 by ``quantize_dynamic``, which swaps a model's children
    (not the model itself): so ``ref`` goes in as the child of a holder."""
    holder = nn.ModuleDict({"rnn": copy.deepcopy(ref)})
    m = quantize_dynamic(holder, *spec, dtype=torch.qint8)["rnn"]
    if type(m) is type(ref):
        raise Unsupported(f"{quantize_dynamic.__module__}.quantize_dynamic left the {type(ref).__name__} unquantized")
    return m


class TorchInt8(Provider):
    name = "torch-int8"
    what = "torch.ao.quantization.quantize_dynamic (int8 weights), inference only"
    dtypes = ("float32",)
    modes = INFERENCE

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        if case.family == "RNN":
            raise Unsupported("torch's quantize_dynamic does not quantize nn.RNN")
        m = _quantized(torch.ao.quantization.quantize_dynamic, ref,
                       {nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell})
        return Built(module_step(m, case, inputs, torch.float32),
                     f"quantized engine {torch.backends.quantized.engine}")


@contextlib.contextmanager
def _record_backends(names: list[str]) -> Any:
    """Record the rnnfast backends whose ``rnn`` or ``cell`` runs inside the block (patched on the instances)."""
    seen: list[str] = []
    patched = []
    for n in names:
        b = get_backend(n)
        if b.unavailable_reason() is not None:
            continue
        for method in ("rnn", "cell"):
            def wrapper(*args, _b=b, _orig=getattr(b, method), **kwargs):
                seen.append(_b.name)
                return _orig(*args, **kwargs)

            setattr(b, method, wrapper)
        patched.append(b)
    try:
        yield seen
    finally:
        for b in patched:
            del b.rnn, b.cell


def _built_recording(step: Callable[[], Any], suffix: str = "") -> Built:
    """``step`` run once (the warm-up), naming the rnnfast backends it ran on."""
    with _record_backends(rnnfast.registered_backends()) as seen:
        first = step()
    return Built(step, (",".join(dict.fromkeys(seen)) or "no rnnfast backend") + suffix, first)


def _rnnfast_module(case: Case, ref: nn.Module, backend: str) -> nn.Module:
    layers = {} if case.cell else {"num_layers": case.layers}
    m = getattr(rnnfast, case.family)(case.I, case.H, backend=backend, **layers)
    m.load_state_dict(ref.state_dict())
    return m.to(next(ref.parameters()).device)


class RnnfastBackend(Provider):
    """One rnnfast backend, run only where it runs itself (a fallback is reported, not timed)."""

    def __init__(self, backend: str, kernel: Optional[str] = None) -> None:
        self.backend = backend
        self.kernel = kernel  # the triton backend's kernel choice, e.g. "step"
        self.name = f"rnnfast-{backend}" + (f"-{kernel}" if kernel else "")
        self.what = f"rnnfast, backend `{backend}`" + (f" forced onto its `{kernel}` kernels" if kernel else "")
        if backend == "reference":  # the readable specification: float32 is enough to place it
            self.dtypes = ("float32",)
            self.what += " (the readable specification; float32 only)"

    def unavailable(self) -> Optional[str]:
        if self.backend not in rnnfast.registered_backends():
            return f"rnnfast has no backend {self.backend!r} registered in this build"
        why = get_backend(self.backend).unavailable_reason()
        if why is None and self.kernel and not hasattr(get_backend(self.backend), "kernel"):
            why = f"the {self.backend} backend has no kernel switch"
        return why

    def _context(self) -> Callable[[], ContextManager]:
        if not self.kernel:
            return contextlib.nullcontext
        backend = get_backend(self.backend)

        @contextlib.contextmanager
        def forced():
            before, backend.kernel = backend.kernel, self.kernel
            try:
                yield
            finally:
                backend.kernel = before

        return forced

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        dtype = DTYPE[case.dtype]
        m = _rnnfast_module(case, ref, self.backend).to(dtype)
        m.train(case.mode == "fwdbwd")
        x = inputs.x.to(dtype)
        b = get_backend(self.backend)
        why = b.unsupported_reason(m._spec(), x, False)
        if why is not None:
            raise Unsupported(f"falls back to reference: {why}")
        suffix = f" ({self.kernel} kernels)" if self.kernel else ""
        built = _built_recording(module_step(m, case, inputs, dtype, self._context()), suffix)
        if built.ran_on != self.backend + suffix:
            raise Unsupported(f"ran on {built.ran_on}, not {self.backend}")
        return built


class RnnfastAutocast(Provider):
    name = "rnnfast-autocast"
    what = "rnnfast (`auto` backend), float32 module under `torch.autocast(dtype=torch.bfloat16)`"
    dtypes = ("bfloat16",)

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        m = _rnnfast_module(case, ref, "auto")
        return _built_recording(module_step(m, case, inputs, torch.float32, _autocast(inputs.x.device.type)))


class RnnfastInt8(Provider):
    name = "rnnfast-int8"
    what = "rnnfast.quantize_dynamic(model, dtype=torch.qint8), inference only"
    dtypes = ("float32",)
    modes = INFERENCE

    def unavailable(self) -> Optional[str]:
        if not hasattr(rnnfast, "quantize_dynamic"):
            return "rnnfast.quantize_dynamic is missing in this build"
        return None

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        m = _quantized(rnnfast.quantize_dynamic, ref)
        return Built(module_step(m, case, inputs, torch.float32), f"{type(m).__module__}.{type(m).__name__}")


class OnnxRuntime(Provider):
    name = "onnxruntime"
    what = "ONNX Runtime (CPU), torch.nn exported with `torch.onnx.export`, same thread count, inference only"
    dtypes = ("float32",)
    modes = INFERENCE
    cells = False  # a cell's Python loop: no ONNX graph of its own

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def unavailable(self) -> Optional[str]:
        for mod in ("onnxruntime", "onnx"):
            try:
                importlib.import_module(mod)
            except ImportError as err:
                return f"{mod} is not installed ({err})"
        return None

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        import onnxruntime as ort

        lstm = case.family == "LSTM"
        x = inputs.x.cpu().numpy()
        h0 = torch.zeros(case.layers, case.B, case.H)
        state_in = ((h0, h0.clone()),) if lstm else (h0,)
        names_in = ["x", "h0", "c0"] if lstm else ["x", "h0"]
        names_out = ["y", "hn", "cn"] if lstm else ["y", "hn"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            # the TorchScript exporter writes one ONNX LSTM/GRU/RNN operator per layer
            torch.onnx.export(copy.deepcopy(ref).cpu().eval(), (inputs.x.cpu(), *state_in), path, dynamo=False,
                              input_names=names_in, output_names=names_out)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            # idle workers sleep instead of spinning, as torch's do: spinning threads would steal
            # the 2 cores from the provider timed next in the interleaved rounds
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        zeros = {n: h0.numpy() for n in names_in[1:]}
        if case.mode == "fwd":
            feed = {"x": x, **zeros}
            return Built(lambda: torch.from_numpy(sess.run(["y"], feed)[0]), f"ORT {ort.__version__}")
        state = dict(zeros)

        def decode() -> Tensor:
            outs = sess.run(None, {"x": x, **state})
            state.update(zip(names_in[1:], outs[1:]))
            return torch.from_numpy(outs[0])

        return Built(decode, f"ORT {ort.__version__}")


def _peer_reason(module: str, err: Exception) -> str:
    """Why a peer is missing: the install step's record when there is one, else the import error."""
    import json

    if os.path.exists(PEERS_STATUS):
        with open(PEERS_STATUS) as f:
            status = json.load(f).get(module)
        if status and not status.get("ok"):
            return f"install failed: {status.get('reason')}"
    return f"{module} is not importable ({type(err).__name__}: {err}); `python -m bench.peers install` installs it"


class FlashRNN(Provider):
    name = "flashrnn"
    what = ("FlashRNN 1.0.8 (`flashrnn(..., backend='cuda_fused')`, one head of size H); "
            "its input projection is an nn.Linear, counted in the time")
    modes = ("fwd", "fwdbwd")

    def unavailable(self) -> Optional[str]:
        try:
            importlib.import_module("flashrnn")
        except Exception as err:  # ImportError, or a build error at import
            return _peer_reason("flashrnn", err)
        return None

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        from flashrnn import flashrnn

        if case.family not in ("LSTM", "GRU") or case.layers != 1:
            raise Unsupported("one LSTM or GRU layer only (FlashRNN is a single-layer function)")
        dtype = DTYPE[case.dtype]
        G = 4 if case.family == "LSTM" else 3
        dev = inputs.x.device
        proj = nn.Linear(case.I, G * case.H, device=dev, dtype=dtype)
        R = (torch.randn(G, 1, case.H, case.H, device=dev, dtype=dtype) / case.H ** 0.5).requires_grad_()
        b = torch.zeros(G, 1, case.H, device=dev, dtype=dtype, requires_grad=True)
        x = inputs.x.to(dtype).transpose(0, 1).contiguous()  # FlashRNN is batch-first
        fn = case.family.lower()

        def forward(xx: Tensor) -> Tensor:
            Wx = proj(xx).view(case.B, case.T, G, 1, case.H)
            return flashrnn(Wx, R, b, function=fn, backend="cuda_fused", dtype=case.dtype)[0][0]

        if case.mode == "fwd":
            def fwd() -> Tensor:
                with torch.no_grad():
                    return forward(x)

            return Built(fwd, "flashrnn cuda_fused")
        xg = x.clone().requires_grad_()

        def fwdbwd() -> Tensor:
            out = forward(xg)
            out.backward(torch.ones_like(out))
            return out

        return Built(fwdbwd, "flashrnn cuda_fused")


class Haste(Provider):
    name = "haste"
    what = "Haste (`haste_pytorch` LSTM/GRU layers, CUDA), float32"
    dtypes = ("float32",)
    modes = ("fwd", "fwdbwd")

    def unavailable(self) -> Optional[str]:
        try:
            importlib.import_module("haste_pytorch")
        except Exception as err:
            return _peer_reason("haste_pytorch", err)
        return None

    def build(self, case: Case, ref: nn.Module, inputs: Inputs) -> Built:
        import haste_pytorch

        if case.family not in ("LSTM", "GRU") or case.layers != 1:
            raise Unsupported("one LSTM or GRU layer only (Haste layers are single-layer)")
        m = getattr(haste_pytorch, case.family)(case.I, case.H).to(inputs.x.device)
        m.train(case.mode == "fwdbwd")
        return Built(module_step(m, case, inputs, torch.float32), "haste")


def default_providers(device: str, threads: int) -> list[Provider]:
    """Every provider for ``device``: on CPU torch.nn (float32, bfloat16, autocast, int8), ONNX Runtime
    and rnnfast's CPU-side backends; on GPU cuDNN, rnnfast's GPU backends, FlashRNN and Haste.

    rnnfast backends registered later than this list are picked up by name; ``reference`` is not
    run on GPU (it is the readable specification, far slower than every other provider there).
    """
    gpu_backends = ["triton", "cuda"]
    backends = [n for n in dict.fromkeys(rnnfast.registered_backends() + gpu_backends)
                if (n in gpu_backends) == (device == "cuda") and not (device == "cuda" and n == "reference")]
    rnnfast_providers: list[Provider] = [RnnfastBackend(n) for n in backends]
    if device == "cuda":
        rnnfast_providers.insert(backends.index("triton") + 1, RnnfastBackend("triton", kernel="step"))
        return [TorchNN(), TorchAutocast(), *rnnfast_providers, RnnfastAutocast(), FlashRNN(), Haste()]
    return [TorchNN(), TorchAutocast(), TorchInt8(), OnnxRuntime(threads), *rnnfast_providers, RnnfastAutocast(),
            RnnfastInt8()]
