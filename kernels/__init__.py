"""Triton kernels for rnnfast, installed as ``rnnfast.kernels``.

``rnn_fwd`` / ``rnn_bwd`` run one layer direction on the kernel :func:`choose_kernel`
picks: the persistent kernels (:mod:`.persistent`, one launch, many programs
synchronised per step), the sequence kernels (:mod:`.sequence`, one launch, one
program per row tile) or the step kernels (:mod:`.step`, one launch per step).
"""

from .persistent import persistent_config
from .rnn import KERNELS, LayerGrads, choose_kernel, layer_outputs, rnn_bwd, rnn_fwd
from .step import FwdState
from .utils import SEQUENCE_MAX_HIDDEN, use_sequence_kernel

__all__ = ["rnn_fwd", "rnn_bwd", "layer_outputs", "FwdState", "LayerGrads", "choose_kernel", "KERNELS",
           "persistent_config", "use_sequence_kernel", "SEQUENCE_MAX_HIDDEN"]
