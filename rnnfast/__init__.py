"""rnnfast: fused-kernel LSTM, GRU and Elman RNN layers, drop-in for torch.nn.

    import rnnfast
    lstm = rnnfast.LSTM(256, 512, num_layers=2, batch_first=True)   # like nn.LSTM
    model = rnnfast.convert(model)                                   # or swap in place

Backends: ``reference`` (pure PyTorch, the specification), ``cpu`` (C++/OpenMP
extension), ``triton`` (fused GPU kernels), ``cuda`` (C++/CUDA extension) and ``auto`` (fastest usable one).
"""

from . import reference  # noqa: F401  (registers the "reference" backend)
from .backend import (
    ENV_VAR,
    Backend,
    RNNSpec,
    available_backends,
    register_backend,
    registered_backends,
)
from .backend import register_lazy
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert
from .quantize import quantize_dynamic

register_lazy("cpu", "rnnfast.cpu", "CPUBackend")
register_lazy("triton", "rnnfast.triton_backend", "TritonBackend")
register_lazy("cuda", "rnnfast.cuda_backend", "CUDABackend")

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "convert",
    "quantize_dynamic",
    "available_backends",
    "registered_backends",
    "register_backend",
    "Backend",
    "RNNSpec",
    "ENV_VAR",
]
