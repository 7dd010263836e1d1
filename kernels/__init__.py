"""Triton kernels for rnnfast, installed as ``rnnfast.kernels``.

``rnn_fwd`` / ``rnn_bwd`` run one layer direction: the sequence kernels
(:mod:`.sequence`, one launch for all steps) for small hidden sizes, the step
kernels (:mod:`.step`, one launch per step) elsewhere; the choice is made in
:func:`use_sequence_kernel`.
"""

from .rnn import LayerGrads, layer_outputs, rnn_bwd, rnn_fwd
from .step import FwdState
from .utils import SEQUENCE_MAX_HIDDEN, use_sequence_kernel

__all__ = ["rnn_fwd", "rnn_bwd", "layer_outputs", "FwdState", "LayerGrads", "use_sequence_kernel",
           "SEQUENCE_MAX_HIDDEN"]
