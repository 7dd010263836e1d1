"""torch's own test inputs for its recurrent modules (``common_modules.module_db``),
run through rnnfast's twins: the same outputs, and the same errors with the same messages."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (in requirements-dev.txt)")
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

import rnnfast

from conftest import backend_device

NAMES = ("RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell")
INFOS = {info.module_cls.__name__: info for info in module_db if info.module_cls in {getattr(torch.nn, n) for n in NAMES}}


def _flat(obj):
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for o in obj for t in _flat(o)]


def _twins(name, backend, ctor):
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*ctor.args, **ctor.kwargs)
    ours = getattr(rnnfast, name)(*ctor.args, backend=backend, **ctor.kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_module_db_inputs(backend, name, training):
    device = backend_device(backend)
    kwargs = {"with_packed_sequence": True} if name in ("RNN", "GRU") else {}
    samples = INFOS[name].module_inputs_func(INFOS[name], device=device, dtype=torch.float32, requires_grad=True,
                                              training=training, **kwargs)
    assert samples
    for sample in samples:
        ref, ours = _twins(name, backend, sample.constructor_input)
        ref, ours = ref.to(device).train(training), ours.to(device).train(training)
        args = sample.forward_input.args
        torch.manual_seed(1)
        want = _flat(ref(*copy.deepcopy(args), **sample.forward_input.kwargs))
        torch.manual_seed(1)
        got = _flat(ours(*copy.deepcopy(args), **sample.forward_input.kwargs))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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
                getattr(rnnfast, name)(*ctor.args, **ctor.kwargs)
            continue
        _, ours = _twins(name, backend, ctor)
        with pytest.raises(err.error_type, match=err.error_regex):
            ours.to(device)(*sample.forward_input.args, **sample.forward_input.kwargs)
