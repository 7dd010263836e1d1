"""torch's own test inputs for its recurrent modules (``common_modules.module_db``),
run through rnnfast's twins: the same outputs and gradients, with no fallback to
another backend, and the same errors with the same messages."""

import copy
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (in requirements-dev.txt)")
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import rnnfast  # noqa: E402
from rnnfast.backend import BackendFallbackWarning  # noqa: E402

from conftest import INTERPRETED, backend_device  # noqa: E402
from parity import CELL_FAMILIES, FAMILIES, flat, twins  # noqa: E402

NAMES = FAMILIES + CELL_FAMILIES
INFOS = {info.module_cls.__name__: info for info in module_db if info.module_cls.__name__ in NAMES}


def _leaves(obj) -> list[torch.Tensor]:
    """The tensors in a call's arguments that gradients reach (leaves requiring grad), in order."""
    if isinstance(obj, PackedSequence):
        obj = obj.data
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad and obj.is_leaf else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o)]
    return []


def _run(module, args, kwargs):
    """Outputs, then the gradients of a fixed random projection of them w.r.t. inputs and parameters."""
    args = copy.deepcopy(args)
    torch.manual_seed(1)  # same dropout masks
    out = flat(module(*args, **kwargs))
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in out)
    wrt = _leaves(args) + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [t.detach() for t in out], grads


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_module_db_inputs(backend, name, training):
    """Every sample of torch's, in eval and in train mode (under the Triton interpreter: half of them in
    each, together every sample once)."""
    device = backend_device(backend)
    kwargs = {"with_packed_sequence": True} if name in ("RNN", "GRU") else {}
    samples = INFOS[name].module_inputs_func(INFOS[name], device=device, dtype=torch.float32, requires_grad=True,
                                              training=training, **kwargs)
    assert samples
    if backend in INTERPRETED:  # each sample in one of the two modes, alternating: the interpreter took 3 min for both
        samples = samples[int(training)::2]
    for sample in samples:
        ctor = sample.constructor_input
        ref, ours = twins(name, backend, *ctor.args, **{"device": device, **ctor.kwargs})
        ref.train(training)
        ours.train(training)
        call = (sample.forward_input.args, sample.forward_input.kwargs)
        want, want_g = _run(ref, *call)
        with warnings.catch_warnings():
            warnings.simplefilter("error", BackendFallbackWarning)  # a fallback is not parity
            got, got_g = _run(ours, *call)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert len(got_g) == len(want_g)
        for k, (a, b) in enumerate(zip(got_g, want_g)):
            assert (a is None) == (b is None), f"gradient {k}: {a} vs torch's {b}"
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_module_db_error_inputs(backend, name):
    device = backend_device(backend)
    info = INFOS[name]
    errors = info.module_error_inputs_func(info, device=device, dtype=torch.float32, requires_grad=False,
                                           training=False)
    assert errors
    for err in errors:
        sample = err.module_error_input
        ctor = sample.constructor_input
        if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type, match=err.error_regex):
                getattr(rnnfast, name)(*ctor.args, backend=backend, **ctor.kwargs)
            continue
        _, ours = twins(name, backend, *ctor.args, **{"device": device, **ctor.kwargs})
        with pytest.raises(err.error_type, match=err.error_regex):
            ours(*sample.forward_input.args, **sample.forward_input.kwargs)
