"""Checkpoints and copies: state_dict between rnnfast and torch.nn both ways, pickle,
deepcopy, and new weights (load_state_dict, an optimizer step) reaching the fast paths'
weight caches on every backend."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import rnnfast
from rnnfast.export import to_torch

from conftest import backend_device

LAYERS = {
    "LSTM": lambda: nn.LSTM(5, 8, num_layers=2),
    "LSTM-proj-bi": lambda: nn.LSTM(5, 8, proj_size=3, bidirectional=True),
    "GRU": lambda: nn.GRU(5, 8, num_layers=2),
    "RNN-relu": lambda: nn.RNN(5, 8, nonlinearity="relu", bias=False),
    "LSTMCell": lambda: nn.LSTMCell(5, 8),
    "GRUCell": lambda: nn.GRUCell(5, 8),
    "RNNCell": lambda: nn.RNNCell(5, 8),
}
# (T, B): one row takes the cpu backend's decode path (weights packed and cached across calls),
# 6 x 4 its fused loop (panels cached across calls)
SHAPES = [pytest.param(1, 1, id="decode"), pytest.param(6, 4, id="fused", marks=pytest.mark.slow)]


def inputs(name, T, B, device):
    g = torch.Generator().manual_seed(2)
    shape = (B, 5) if name.endswith("Cell") else (T, B, 5)
    return torch.randn(shape, generator=g).to(device)


def outputs(model, x):
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(model(x))


def assert_same(got, want):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_round_trip_with_torch_nn(name):
    """rnnfast -> torch.nn -> rnnfast, with strict loading: the same keys, the same numbers."""
    torch.manual_seed(0)
    ours = rnnfast.convert(LAYERS[name]())
    theirs = LAYERS[name]()
    theirs.load_state_dict(ours.state_dict())
    back = rnnfast.convert(LAYERS[name]())
    back.load_state_dict(theirs.state_dict())
    x = inputs(name, 6, 4, "cpu")
    assert_same(outputs(back, x), outputs(theirs, x))
    assert_same(outputs(ours, x), outputs(theirs, x))


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_class_backend_and_numbers(how):
    torch.manual_seed(0)
    model = rnnfast.convert(nn.Sequential(nn.Linear(5, 5), nn.GRU(5, 8, num_layers=2)), backend="reference")
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert type(copied[1]) is rnnfast.GRU and copied[1].backend == "reference"
    x = torch.randn(6, 4, 5)
    assert_same(copied(x)[0], model(x)[0])
    with torch.no_grad():  # a copy owns its weights: changing them leaves the original as it was
        copied[1].weight_hh_l0.zero_()
    assert not torch.allclose(copied(x)[0], model(x)[0])


def test_to_torch_undoes_convert():
    torch.manual_seed(0)
    model = rnnfast.convert(nn.Sequential(nn.LSTM(5, 8), nn.GRUCell(8, 8)))
    params = list(model.parameters())
    to_torch(model)
    assert [type(m) for m in model] == [nn.LSTM, nn.GRUCell]
    assert list(model.parameters()) == params and "_backend" not in vars(model[0])


@pytest.mark.parametrize("T, B", SHAPES)
@pytest.mark.parametrize("name", LAYERS)
def test_new_weights_reach_the_fast_path(backend, name, T, B):
    """After a call has cached packed weights, load_state_dict and an optimizer step take effect."""
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = LAYERS[name]().to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = inputs(name, T, B, device)
    assert_same(outputs(ours, x), outputs(ref, x))  # packs and caches the first weights

    torch.manual_seed(1)
    ref.load_state_dict(LAYERS[name]().state_dict())
    ours.load_state_dict(ref.state_dict())
    assert_same(outputs(ours, x), outputs(ref, x))

    for model in (ref, ours):
        loss = sum(o.square().sum() for o in torch.utils._pytree.tree_leaves(model(x)))
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert_same(outputs(ours, x), outputs(ref, x))


# Writes through ``.data`` bump no version counter; the caches fingerprint the weights instead
# (small tensors whole, large ones sampled: H = 64 makes W_hh 16k elements, past the whole-copy size).
DATA_EDITS = {
    "mul": lambda m, H: m.weight_hh_l0.data.mul_(2),
    "copy": lambda m, H: m.weight_ih_l0.data.copy_(torch.linspace(-1, 1, m.weight_ih_l0.numel()).view_as(
        m.weight_ih_l0)),
    "one-gate": lambda m, H: m.weight_hh_l0.data[2 * H:3 * H].zero_(),
    "forget-bias": lambda m, H: m.bias_ih_l0.data[H:2 * H].fill_(1.0),
    "assign": lambda m, H: setattr(m.weight_hh_l0, "data", m.weight_hh_l0.data * 0.5),
}


@pytest.mark.parametrize("T, B", SHAPES)
@pytest.mark.parametrize("edit", DATA_EDITS)
def test_in_place_edit_through_data(backend, edit, T, B):
    """Old-style code edits weights through ``.data`` after a forward; the next call sees the edit."""
    device = backend_device(backend)
    torch.manual_seed(0)
    H = 64
    ref = nn.LSTM(5, H, num_layers=2).to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = inputs("LSTM", T, B, device)
    assert_same(outputs(ours, x), outputs(ref, x))  # packs and caches
    for model in (ref, ours):
        DATA_EDITS[edit](model, H)
    assert_same(outputs(ours, x), outputs(ref, x))


def test_manual_sgd_through_data(backend):
    """The classic word-language-model loop: ``p.data.add_(p.grad, alpha=-lr)`` after each backward."""
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = nn.GRU(5, 64).to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = inputs("GRU", 6, 4, device)
    for _ in range(3):
        for model in (ref, ours):
            model.zero_grad()
            model(x)[0].square().sum().backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)
        assert_same(outputs(ours, x), outputs(ref, x))
