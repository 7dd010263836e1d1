"""rnnfast layers under torch's graph capturers: ONNX export, ``torch.export``,
``torch.jit.trace`` and ``torch.jit.script``.

Those tools record a program to run elsewhere. While one of them runs, a layer
or cell takes torch.nn's own forward (``torch.jit.script`` compiles its torch.nn
twin, :func:`torch_twin`), so the recorded graph is exactly torch.nn's:
``aten::lstm`` / ``aten::gru`` / ``aten::rnn_tanh`` (the standard ONNX LSTM, GRU
and RNN operators once exported), valid for any sequence length and runnable
without rnnfast. rnnfast's own paths would not record well: the ``reference``
and ``triton`` backends loop over time in Python (a trace unrolls the loop for
one length), the cpu decode path is not an operator at all, a trace of the cpu
operators bakes in whether to save for backward (``torch.jit.trace``'s check
re-traces under ``no_grad`` and saw a different graph), and a graph of
``rnnfast::`` operators only runs where rnnfast is imported. ``torch.compile``
is not a capture for export: it keeps rnnfast's fast operators.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["capturing", "check_onnx_exportable", "to_torch", "torch_twin"]


def capturing() -> bool:
    """True while ONNX export, ``torch.export`` or ``torch.jit.trace`` records a forward.

    The two ONNX exporters capture through these (the TorchScript one traces, the dynamo one
    runs ``torch.export``); ``torch.onnx.is_in_onnx_export()`` would add 3 us to every call.
    """
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def check_onnx_exportable(module: nn.Module) -> None:
    """Raise for what the ONNX recurrent operators cannot express, rather than export a wrong model.

    ONNX's LSTM has no output projection: torch.nn's TorchScript exporter refuses
    ``proj_size > 0`` and its dynamo exporter writes a model ONNX Runtime rejects.
    """
    if getattr(module, "proj_size", 0) > 0 and _in_onnx_export():
        raise torch.onnx.errors.OnnxExporterError(
            f"rnnfast.{type(module).__name__} with proj_size={module.proj_size} cannot be exported to ONNX: "
            "the ONNX LSTM operator has no output projection. Export a model with proj_size=0, "
            "or capture it with torch.export or torch.jit.trace instead."
        )


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, also under the dynamo exporter's strict capture.

    Dynamo folds that function to ``False``, and the dynamo exporter retries a
    failed non-strict capture in strict mode; the exporter's own flag (private,
    hence the ``getattr``) reads true there too.
    """
    from torch.onnx._internal.exporter import _flags

    return torch.onnx.is_in_onnx_export() or getattr(_flags, "_is_onnx_exporting", False)


def _torch_class(module: nn.Module) -> Optional[type]:
    """The torch.nn class of an rnnfast layer or cell, else None."""
    from .modules import _SWAPS

    return {ours: theirs for theirs, ours in _SWAPS.items()}.get(type(module))


def torch_twin(module: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles for an rnnfast layer or cell (its ``__prepare_scriptable__``): an
    instance of its torch.nn class over the same parameters, buffers, hooks and mode (the same dicts), so the
    scripted module is torch.nn's, runs torch.nn's kernels without rnnfast, and trains the same parameters.
    ``module`` itself keeps its class; torch's scripting puts the twin in place of a layer in its parent."""
    twin = object.__new__(_torch_class(module))
    twin.__dict__.update(module.__dict__)
    twin.__dict__.pop("_backend", None)
    return twin


def to_torch(model: nn.Module) -> nn.Module:
    """Undo :func:`rnnfast.convert`: every rnnfast layer and cell in ``model`` becomes its torch.nn class, in place.

    Parameters, hooks and mode are kept (only the class changes). Returns ``model``.
    """
    for module in model.modules():
        target = _torch_class(module)
        if target is not None:
            module.__dict__.pop("_backend", None)
            module.__class__ = target
    return model
