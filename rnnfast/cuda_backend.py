"""The ``cuda`` backend: the C++/CUDA extension ``rnnfast._cuda`` (``csrc/cuda/``).

Layers run the same operators as the ``cpu`` backend, ``rnnfast::layer_fwd`` and
``rnnfast::layer_bwd``, through their CUDA implementations: the autograd and fake
kernels registered in :mod:`rnnfast.cpu` serve both, so this module adds only the
device checks and the decode path. Inference on a few rows takes
``_cuda.decode``: every layer in one call, one kernel launch per layer and step,
biases packed once and cached until a parameter changes.

Without a CUDA build of torch, the extension or a device the backend stays
registered but unavailable, saying which of these is missing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import MODE_ID, Backend, RNNSpec
from .cpu import CPUBackend, _needs_grad, stack_decodes

try:
    from . import _cuda
except ImportError as err:
    _cuda = None
    if torch.version.cuda is None:
        _IMPORT_ERROR: Optional[str] = (
            f"torch {torch.__version__} is a CPU-only build; the cuda backend needs a CUDA build of torch "
            "and the rnnfast._cuda extension built with it")
    else:
        _IMPORT_ERROR = (f"the rnnfast._cuda extension is not built or does not load ({err}); reinstall with nvcc "
                         "on PATH (RNNFAST_CUDA=1 makes a failed CUDA build an error)")
else:
    _IMPORT_ERROR = None

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Decode: up to DECODE_MAX_B rows (the kernel's bound) and short sequences, where one
# launch per layer and step beats the per-step GEMM + gate kernel of the layer loop.
# Provisional bounds, not yet measured on a GPU.
DECODE_MAX_T = 16


def takes_decode(spec: RNNSpec, x: Tensor, batch_sizes: Optional[Tensor], needs_grad: bool, max_b: int) -> bool:
    """Whether a call goes to the one-call decode path rather than the layer loop (whose kernels have no
    proj_size)."""
    return (x.size(0) <= DECODE_MAX_T and 0 < x.size(1) <= max_b and spec.proj_size == 0
            and stack_decodes(spec, batch_sizes, needs_grad))


class CUDABackend(CPUBackend):
    """C++ time loop over cuBLAS with fused CUDA gate kernels; every layer option, four dtypes."""

    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def unsupported_reason(self, spec: RNNSpec, x: Tensor, packed: bool) -> Optional[str]:
        if x.device.type != "cuda":
            return f"the input is on {x.device}, the cuda backend runs on CUDA tensors only"
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype} is not supported (float32, float64, float16, bfloat16 are)"
        return None

    def rnn(
        self,
        spec: RNNSpec,
        x: Tensor,
        batch_sizes: Optional[Tensor],
        h0: Tensor,
        c0: Optional[Tensor],
        weights: list[Tensor],
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Few-row unidirectional inference takes the decode path, the rest runs layer by layer."""
        if takes_decode(spec, x, batch_sizes, _needs_grad(x, h0, c0, weights), _cuda.DECODE_MAX_B):
            return _cuda.decode(MODE_ID[spec.mode], weights, spec.num_layers, spec.bias, x, h0, c0)
        return Backend.rnn(self, spec, x, batch_sizes, h0, c0, weights)
