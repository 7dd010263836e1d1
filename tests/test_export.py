"""Graph capture of models with rnnfast layers: ONNX export (both exporters) run in
ONNX Runtime, torch.export, torch.jit.trace with its checks, and torch.jit.script's
error. Each captures torch.nn's graph (see rnnfast.export), so each is compared
with the same model in torch.nn classes."""

import collections
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast

onnx = pytest.importorskip("onnx", reason="onnx is a test dependency (requirements-dev.txt)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test dependency (requirements-dev.txt)")

RECURRENT_OPS = {"LSTM", "GRU", "RNN"}


class Zoo(nn.Module):
    """Every layer option the ONNX recurrent operators express, and the three cells."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 7, bias=False)
        self.relu = nn.RNN(7, 4, nonlinearity="relu")
        self.tanh = nn.RNN(4, 3)
        self.cells = nn.ModuleList([nn.LSTMCell(4, 3), nn.GRUCell(4, 3), nn.RNNCell(4, 3, nonlinearity="relu")])

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))  # batch-first, given state
        y, hg = self.gru(y.transpose(0, 1))  # time-major, zero state
        y, hr = self.relu(y)
        yu, hu = self.tanh(y[:, 0])  # unbatched
        lc, lh = self.cells[0](y[-1])
        return y, h, c, hg, hr, yu, hu, lc, lh, self.cells[1](y[-1], lh), self.cells[2](y[-1])


class PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(5, 7, num_layers=2)

    def forward(self, x, lengths):
        y, h = self.gru(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(y)[0], h


def zoo_inputs(T=4, B=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, 5, generator=g), torch.randn(4, B, 6, generator=g), torch.randn(4, B, 6, generator=g)


def twins(cls):
    """A torch.nn model and its converted copy (same weights), in eval mode."""
    torch.manual_seed(0)
    ref = cls().eval()
    return ref, rnnfast.convert(copy.deepcopy(ref), backend="cpu" if "cpu" in rnnfast.available_backends() else "auto")


def export(model, inputs, path, dynamo, **kwargs):
    torch.onnx.export(model, inputs, str(path), dynamo=dynamo, **kwargs)
    ops = collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ops, session


def ort_run(session, inputs):
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]


def assert_outputs(got, want):
    want = torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_is_torch_nn_export(dynamo, tmp_path):
    """The same ONNX operators as torch.nn's export, and ONNX Runtime gives torch.nn's numbers."""
    ref, ours = twins(Zoo)
    inputs = zoo_inputs()
    ours_ops, session = export(ours, inputs, tmp_path / "ours.onnx", dynamo)
    ref_ops, _ = export(ref, inputs, tmp_path / "ref.onnx", dynamo)
    assert ours_ops == ref_ops
    assert RECURRENT_OPS & set(ours_ops)  # the ONNX recurrent operators, not an unrolled loop only
    with torch.no_grad():
        assert_outputs(ort_run(session, inputs), ref(*inputs))


def test_onnx_export_dynamic_length_and_packed(tmp_path):
    """Packed input and a dynamic sequence length, as torch.nn exports them (TorchScript exporter:
    torch.nn's packed layers do not pass torch.export, the dynamo exporter's first step)."""
    ref, ours = twins(PackedGRU)
    x, lengths = torch.randn(6, 3, 5), torch.tensor([4, 6, 2])
    ours_ops, session = export(ours, (x, lengths), tmp_path / "packed.onnx", False, input_names=["x", "lengths"],
                               dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}})
    assert ours_ops["GRU"] == 2
    with torch.no_grad():
        for T, B in ((6, 3), (9, 2)):
            x, lengths = torch.randn(T, B, 5), torch.tensor([T, max(1, T - 3)][:B])
            assert_outputs(ort_run(session, (x, lengths)), ref(x, lengths))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_refuses_projections(dynamo, tmp_path):
    """ONNX's LSTM has no projection: a named error, not the invalid model torch.nn's dynamo export writes."""
    model = rnnfast.LSTM(5, 7, proj_size=3).eval()
    with pytest.raises(torch.onnx.errors.OnnxExporterError) as caught:
        torch.onnx.export(model, (torch.randn(4, 2, 5),), str(tmp_path / "proj.onnx"), dynamo=dynamo)
    chain, err = [], caught.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("proj_size=3 cannot be exported to ONNX" in m for m in chain)


def test_torch_export_records_torch_nn_ops():
    ref, ours = twins(Zoo)
    inputs = zoo_inputs()
    program = torch.export.export(ours, inputs)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.lstm.input", "aten.gru.input", "aten.rnn_relu.input"} <= targets
    assert not any("rnnfast" in t for t in targets)
    with torch.no_grad():
        assert_outputs(program.module()(*inputs), ref(*inputs))


def test_jit_trace_passes_its_checks_and_generalises():
    """The trace checks (a second trace under no_grad, outputs compared) pass, and the traced
    graph holds aten::lstm etc., so it runs other lengths and batch sizes and differentiates."""
    ref, ours = twins(Zoo)
    traced = torch.jit.trace(ours, zoo_inputs(), check_inputs=[zoo_inputs(7, 2)])
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert {"aten::lstm", "aten::gru", "aten::rnn_relu", "aten::rnn_tanh"} <= kinds
    assert not any(k.startswith("rnnfast::") for k in kinds)
    inputs = zoo_inputs(9, 1)
    assert_outputs(torch.utils._pytree.tree_leaves(traced(*inputs)), ref(*inputs))
    got = torch.autograd.grad(sum(o.sum() for o in traced(*inputs)), list(traced.parameters()))
    want = torch.autograd.grad(sum(o.sum() for o in torch.utils._pytree.tree_leaves(ref(*inputs))),
                               list(ref.parameters()))
    assert_outputs(list(got), want)


def test_jit_script_compiles_torch_nn_twins():
    """torch.jit.script compiles each rnnfast layer's torch.nn twin over the same parameters: torch.nn's
    outputs and gradients, saved and loaded without rnnfast; the twins take the layers' places in the
    scripted model's parents (torch's own prepare step), still training the same parameters."""
    ref, ours = twins(Zoo)
    scripted = torch.jit.script(ours)
    kinds = {n.kind() for n in scripted.inlined_graph.nodes()}
    assert {"aten::lstm", "aten::gru", "aten::rnn_relu"} <= kinds
    assert not any(k.startswith("rnnfast::") for k in kinds)
    inputs = zoo_inputs()
    assert_outputs(torch.utils._pytree.tree_leaves(scripted(*inputs)), ref(*inputs))
    got = torch.autograd.grad(sum(o.sum() for o in torch.utils._pytree.tree_leaves(scripted(*inputs))),
                              list(ours.parameters()))
    want = torch.autograd.grad(sum(o.sum() for o in torch.utils._pytree.tree_leaves(ref(*inputs))),
                               list(ref.parameters()))
    assert_outputs(list(got), want)
    assert type(ours.lstm) is nn.LSTM and ours.lstm.weight_hh_l0 is scripted.lstm.weight_hh_l0
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert_outputs(torch.utils._pytree.tree_leaves(torch.jit.load(buffer)(*inputs)), ref(*inputs))
    cell = rnnfast.GRUCell(3, 4)  # a layer scripted on its own stays as it was
    torch.jit.script(cell)
    assert type(cell) is rnnfast.GRUCell