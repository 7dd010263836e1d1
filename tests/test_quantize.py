"""rnnfast.quantize_dynamic: int8 layers and cells against float32 and torch's own
dynamic-quantized modules, the kernel against a Python model of its integer math,
every kernel build (VNNI, AVX2, baseline) against each other, decoding with a
carried state, every layer option, bad inputs and the inference-only rule."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast
from parity import num_threads
from rnnfast import quantize as rq

pytestmark = pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="the CPU extension is not built")

ISAS = ["vnni", "avx2", "base"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Runs a test on one kernel build, capped from the CPU's best."""
    monkeypatch.setattr(rq, "_ISA_CAP", request.param)
    if rq.kernel_isa() != request.param:
        pytest.skip(f"this CPU has no {request.param} kernel (best: {rq.kernel_isa()})")
    return request.param


def _float(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).eval()


def _max_err(got, want) -> float:
    if isinstance(want, (tuple, list)):
        return max(_max_err(g, w) for g, w in zip(got, want))
    return (got - want).abs().max().item()


def _torch_quantized(module: nn.Module) -> nn.Module:
    """torch's dynamic int8 twin (torch swaps children only, hence the wrapper)."""
    return torch.ao.quantization.quantize_dynamic(nn.Sequential(module), dtype=torch.qint8)[0]


# ---- against torch's own int8 modules: no more than twice their error against float ----

TORCH_CASES = [
    ("LSTM", lambda: _float(nn.LSTM, 64, 128, num_layers=2), (20, 3, 64)),
    ("GRU", lambda: _float(nn.GRU, 64, 128, num_layers=2), (20, 3, 64)),
    ("LSTMCell", lambda: _float(nn.LSTMCell, 64, 128), (5, 64)),
    ("GRUCell", lambda: _float(nn.GRUCell, 64, 128), (5, 64)),
    ("RNNCell", lambda: _float(nn.RNNCell, 64, 128), (5, 64)),
]


@pytest.mark.parametrize("name,make,shape", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
@torch.no_grad()
def test_error_at_most_twice_torch_int8(name, make, shape):
    model = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    want = model(x)
    ours = rnnfast.quantize_dynamic(model)(x)
    theirs = _torch_quantized(copy.deepcopy(model))(x)
    err, torch_err = _max_err(ours, want), _max_err(theirs, want)
    assert 0 < err <= 2 * torch_err, f"{name}: rnnfast int8 error {err:.2e}, torch int8 error {torch_err:.2e}"


# ---- the kernel against a Python model of its integer math ------------------------------

def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization, step for step in float32: x ~ s * (u - zp)."""
    lo = x.amin(1).clamp(max=0)
    hi = x.amax(1).clamp(min=0)
    s = (hi - lo) / 255
    s = torch.where(s > 0, s, torch.ones_like(s))
    inv = 1 / s
    z = torch.floor(-lo * inv + 0.5)
    u = torch.floor((x * inv[:, None] + z[:, None]).clamp(0, 255) + 0.5)
    return u.double(), s.double(), z.double()


def _int8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    u, s, z = _quantize_rows(x)
    acc = (u - z[:, None]) @ q.double().t()  # exact in float64 at these sizes
    out = acc * s[:, None] * scale.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_cell_matches_model_of_integer_math(cls, bias, isa):
    cell = _float(cls, 13, 37, bias=bias)  # sizes that pad K and the 16-unit blocks
    qcell = rnnfast.quantize_dynamic(cell)
    g = torch.Generator().manual_seed(2)
    x, h, c = torch.randn(6, 13, generator=g), torch.randn(6, 37, generator=g), torch.randn(6, 37, generator=g)
    gi = _int8_product(x, qcell.weight_ih, qcell.weight_ih_scale, qcell.bias_ih if bias else None)
    gh = _int8_product(h, qcell.weight_hh, qcell.weight_hh_scale, qcell.bias_hh if bias else None)
    mode = "LSTM" if cls is nn.LSTMCell else "GRU" if cls is nn.GRUCell else "RNN_TANH"
    want_h, want_c = rnnfast.reference.cell_update(mode, gi, gh, h.double(), c.double())
    if mode == "LSTM":
        got_h, got_c = qcell(x, (h, c))
        torch.testing.assert_close(got_c, want_c.float(), atol=1e-5, rtol=1e-5)
    else:
        got_h = qcell(x, h)
    torch.testing.assert_close(got_h, want_h.float(), atol=1e-5, rtol=1e-5)


# ---- every layer option, every kernel build -------------------------------------------

OPTIONS = [
    ("plain", {}, {}),
    ("layers2", dict(num_layers=2), {}),
    ("bidirectional", dict(num_layers=2, bidirectional=True), {}),
    ("no-bias", dict(bias=False), {}),
    ("batch-first", dict(batch_first=True), {}),
    ("state", {}, dict(state=True)),
    ("unbatched", {}, dict(unbatched=True)),
    ("packed", dict(bidirectional=True), dict(packed=True)),
    ("packed-unsorted-state", dict(num_layers=2), dict(packed=True, unsorted=True, state=True)),
]
LAYERS = [(nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}), (nn.RNN, dict(nonlinearity="relu"))]
# int8 error bound against float32 on these sizes (inputs N(0, 1), default init)
FLOAT_ATOL = 3e-2


def _inputs(layer: nn.Module, how: dict, T: int = 7, B: int = 5):
    """The call's arguments for the float layer: (input, hx)."""
    g = torch.Generator().manual_seed(3)
    D = 2 if layer.bidirectional else 1
    if how.get("unbatched"):
        x = torch.randn(T, layer.input_size, generator=g)
        shape = (layer.num_layers * D, layer.hidden_size)
    else:
        x = torch.randn(B, T, layer.input_size, generator=g) if layer.batch_first else \
            torch.randn(T, B, layer.input_size, generator=g)
        shape = (layer.num_layers * D, B, layer.hidden_size)
    hx = None
    if how.get("state"):
        h = torch.randn(*shape, generator=g) * 0.5
        hx = (h, torch.randn(*shape, generator=g)) if isinstance(layer, nn.LSTM) else h
    if how.get("packed"):
        lengths = torch.tensor([T, 3, T - 1, 1, 5] if how.get("unsorted") else [T, T - 1, 5, 3, 1])
        x = pack_padded_sequence(x, lengths, batch_first=layer.batch_first, enforce_sorted=not how.get("unsorted"))
    return x, hx


def _flat(result, total_length: int | None = None) -> list[torch.Tensor]:
    out, hidden = result
    if isinstance(out, nn.utils.rnn.PackedSequence):
        out = pad_packed_sequence(out, total_length=total_length)[0]
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


@pytest.mark.parametrize("cls,extra", LAYERS, ids=["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("opt", OPTIONS, ids=[o[0] for o in OPTIONS])
@torch.no_grad()
def test_layer_options_close_to_float_on_every_kernel(cls, extra, opt):
    _, kwargs, how = opt
    layer = _float(cls, 11, 37, **extra, **kwargs)
    x, hx = _inputs(layer, how)
    want = _flat(layer(x, hx))
    qlayer = rnnfast.quantize_dynamic(layer)
    results = {}
    for cap in ISAS:
        rq._ISA_CAP = cap
        try:
            results[rq.kernel_isa()] = _flat(qlayer(x, hx))
        finally:
            rq._ISA_CAP = None
    best = results[rq.kernel_isa()]
    for got, ref in zip(best, want):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert _max_err(got, ref) < FLOAT_ATOL
    for isa_name, other in results.items():  # the same integer sums: equal up to float rounding
        for got, ref in zip(other, best):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{isa_name}: {m}")


@pytest.mark.parametrize("cls,extra", LAYERS, ids=["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("opt", OPTIONS, ids=[o[0] for o in OPTIONS])
@torch.no_grad()
def test_common_call_shortcut_returns_the_full_paths_results(cls, extra, opt, monkeypatch):
    """The layers' shortcut for plain tensor calls gives the full path's outputs, bit for bit."""
    _, kwargs, how = opt
    layer = _float(cls, 11, 37, **extra, **kwargs)
    x, hx = _inputs(layer, how)
    qlayer = rnnfast.quantize_dynamic(layer)
    plain = not (how.get("packed") or how.get("unbatched"))
    assert (qlayer._common_call(x, hx) is not None) == plain  # the shortcut takes the plain calls only
    short = _flat(qlayer(x, hx))
    monkeypatch.setattr(type(qlayer), "_common_call", lambda self, input, hx: None)
    full = _flat(qlayer(x, hx))
    for got, want in zip(short, full):
        assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
@torch.no_grad()
def test_decode_with_carried_state_matches_one_call(cls, isa):
    """Step-by-step decoding (T=1, state carried) gives the whole-sequence call's outputs, on 1 and 2 threads."""
    # 11 blocks of 16 units (the last one padded) split 5/6, and enough work per step for 2 threads
    qlayer = rnnfast.quantize_dynamic(_float(cls, 64, 170, num_layers=2))
    x = torch.randn(9, 2, 64, generator=torch.Generator().manual_seed(4))
    for n in (1, 2):
        with num_threads(n):
            want_out, want_state = qlayer(x)
            state, outs = None, []
            for t in range(x.size(0)):
                out, state = qlayer(x[t:t + 1], state)
                outs.append(out)
        torch.testing.assert_close(torch.cat(outs), want_out, atol=1e-6, rtol=1e-6)
        for got, want in zip(_flat((None, state))[1:], _flat((None, want_state))[1:]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        if n == 1:
            one_thread = want_out
    torch.testing.assert_close(want_out, one_thread, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("T,B,I", [(6, 96, 32), (30, 6, 64)], ids=["by-rows", "by-units-shared-rows"])
@torch.no_grad()
def test_large_batch_sequence_close_to_float(T, B, I):
    """Past the small-batch path: 2 threads split a batch of 96 by rows, and one of 6 by units
    with its quantized rows shared (2 barriers a step)."""
    layer = _float(nn.LSTM, I, 96)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(5))
    with num_threads(2):
        assert _max_err(_flat(rnnfast.quantize_dynamic(layer)(x)), _flat(layer(x))) < FLOAT_ATOL


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=["LSTM", "GRU", "RNN"])
@torch.no_grad()
def test_rows_and_units_splits_agree(cls, packed):
    """On 2 threads a batch of 16 splits each step by rows (8 a thread) and its 4-row slices by
    units; each row's integer sums and float steps are the same either way, so the outputs and
    states are equal, bit for bit (2 layers, both directions; packed: rows ending early)."""
    qlayer = rnnfast.quantize_dynamic(_float(cls, 16, 96, num_layers=2, bidirectional=True))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 16, 16, generator=g)
    lengths = torch.randint(1, 8, (16,), generator=g)

    def run(rows):
        xs = x[:, rows]
        if packed:
            xs = pack_padded_sequence(xs, lengths[rows], enforce_sorted=False)
        return _flat(qlayer(xs), total_length=len(x))

    with num_threads(2):
        whole = run(slice(None))
        slices = [run(slice(b, b + 4)) for b in range(0, 16, 4)]
    for i, got in enumerate(whole):
        assert torch.equal(got, torch.cat([s[i] for s in slices], dim=1))


@pytest.mark.parametrize("threads,B", [(2, 17), (6, 48)], ids=["2-threads", "6-threads"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
@torch.no_grad()
def test_rows_split_repeats_one_thread_exactly(cls, packed, threads, B):
    """By rows a thread goes on to the next layer without waiting for the others, so each call races
    them: 2 layers whose inputs differ in width (16, then 192) must give one thread's bits on every
    call. With a row stride that followed the layer's width, one thread's layer 2 inputs overwrote
    another's layer 1 inputs: the 6-thread cases (more threads than a 2-core machine runs at once)
    failed in every run, the 2-thread ones (uneven rows) in some."""
    qlayer = rnnfast.quantize_dynamic(_float(cls, 16, 96, num_layers=2, bidirectional=True))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(7, B, 16, generator=g)
    if packed:
        x = pack_padded_sequence(x, torch.randint(1, 8, (B,), generator=g), enforce_sorted=False)
    with num_threads(1):
        want = _flat(qlayer(x), total_length=7)
    with num_threads(threads):
        for _ in range(30):
            assert all(torch.equal(a, b) for a, b in zip(_flat(qlayer(x), total_length=7), want))


@torch.no_grad()
def test_non_finite_input_gives_nan_not_a_finite_guess():
    qlayer = rnnfast.quantize_dynamic(_float(nn.GRU, 8, 16))
    x = torch.randn(3, 2, 8)
    x[1, 0, 3] = float("inf")
    out, _ = qlayer(x)
    assert out[1:, 0].isnan().all() and out[:, 1].isfinite().all()


# ---- quantize_dynamic: what it replaces, state_dict, repr ----------------------------

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.rnn = rnnfast.LSTM(8, 16, batch_first=True)
        self.cell = nn.GRUCell(16, 16)
        self.head = nn.Linear(16, 10)


def test_quantize_dynamic_replaces_recurrent_modules_only():
    net = Net()
    q = rnnfast.quantize_dynamic(net)
    assert isinstance(q.rnn, rq.QuantizedLSTM) and isinstance(q.cell, rq.QuantizedGRUCell)
    assert type(q.head) is nn.Linear and type(q.embed) is nn.Embedding
    assert isinstance(net.rnn, rnnfast.LSTM), "inplace=False leaves the model alone"
    assert rnnfast.quantize_dynamic(net, {nn.LSTM}).cell is not None
    assert type(rnnfast.quantize_dynamic(net, {nn.LSTM}).cell) is nn.GRUCell
    assert type(rnnfast.quantize_dynamic(net, {"cell"}).rnn) is rnnfast.LSTM
    assert isinstance(rnnfast.quantize_dynamic(net, {"cell": None}).cell, rq.QuantizedGRUCell)
    assert rnnfast.quantize_dynamic(net, inplace=True) is net and isinstance(net.rnn, rq.QuantizedLSTM)
    assert isinstance(rnnfast.quantize_dynamic(nn.GRU(4, 8)), rq.QuantizedGRU)  # the root too


def test_quantize_dynamic_signature_and_mapping_like_torch():
    """torch's parameters in torch's order (model, qconfig_spec, dtype, mapping, inplace); a mapping says
    which classes to swap and what makes each replacement, as torch's does."""
    import inspect

    ours = list(inspect.signature(rnnfast.quantize_dynamic).parameters)
    assert ours == list(inspect.signature(torch.ao.quantization.quantize_dynamic).parameters)
    net = Net()
    assert rnnfast.quantize_dynamic(net, None, torch.qint8, None, True) is net  # inplace, positionally
    net = Net()
    only_cells = rnnfast.quantize_dynamic(net, mapping={nn.GRUCell: rq.QuantizedGRUCell})
    assert isinstance(only_cells.cell, rq.QuantizedGRUCell) and type(only_cells.rnn) is rnnfast.LSTM
    with pytest.raises(TypeError, match="mapping must be a dict"):
        rnnfast.quantize_dynamic(net, None, torch.qint8, True)


def test_state_dict_round_trip_and_repr():
    layer = _float(nn.LSTM, 8, 20, num_layers=2, bidirectional=True, batch_first=True)
    q = rnnfast.quantize_dynamic(layer)
    sd = q.state_dict()
    assert sd["weight_ih_l1_reverse"].dtype == torch.int8 and sd["weight_ih_l1_reverse"].shape == (80, 40)
    assert sd["weight_hh_l0_scale"].shape == (80,) and sd["bias_hh_l0"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    other = rnnfast.quantize_dynamic(_float(nn.LSTM, 8, 20, num_layers=2, bidirectional=True, batch_first=True,
                                            seed=9))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = other(x)[0]
        other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        torch.testing.assert_close(other(x)[0], q(x)[0], atol=0, rtol=0)
        assert _max_err(before, q(x)[0]) > 1e-3
    assert repr(q) == "QuantizedLSTM(8, 20, num_layers=2, batch_first=True, bidirectional=True, dtype=torch.qint8)"


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
        self.cell = nn.GRUCell(16, 5)

    def forward(self, x):
        return self.cell(self.lstm(x)[0][-1])


def test_jit_trace_records_int8_calls_and_script_names_it():
    """torch.jit.trace records the quantized layers (as torch's quantized LSTM traces): the graph calls the
    int8 operator for any length and batch, and saves and loads; torch.jit.script names trace instead."""
    torch.manual_seed(0)
    q = rnnfast.quantize_dynamic(Stack().eval())  # not called before the trace: its packed weights are ready
    traced = torch.jit.trace(q, torch.randn(5, 2, 4))
    assert "rnnfast::quant_rnn" in {n.kind() for n in traced.inlined_graph.nodes()}
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        for T, B in [(5, 2), (9, 3), (1, 1)]:
            x = torch.randn(T, B, 4)
            torch.testing.assert_close(loaded(x), q(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile rnnfast's QuantizedLSTM.*trace"):
        torch.jit.script(q)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRUCell])
def test_autocast_input_runs_in_float32(cls):
    """Under CPU autocast an int8 module takes the bfloat16 output of the layer before it (and bfloat16
    states) as float32 and returns float32: the same values as a float32 call on that input. Outside
    autocast a bfloat16 input still raises."""
    torch.manual_seed(0)
    q = rnnfast.quantize_dynamic(_float(cls, 4, 8))
    x = torch.randn(*((3,) if cls is nn.LSTM else ()), 2, 4).bfloat16()
    h = torch.randn(*((1,) if cls is nn.LSTM else ()), 2, 8).bfloat16()
    hx = (h, h) if cls is nn.LSTM else h
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = q(x, hx)
        want = q(x.float(), tuple(s.float() for s in hx) if cls is nn.LSTM else hx.float())
    assert all(t.dtype == torch.float32 for t in torch.utils._pytree.tree_leaves(got))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if cls is nn.LSTM:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            packed = pack_padded_sequence(x, [3, 2])
            torch.testing.assert_close(q(packed)[0].data, q(pack_padded_sequence(x.float(), [3, 2]))[0].data)
    with pytest.raises(RuntimeError, match="takes float32 input"):  # torch's int8 layers: RuntimeError
        q(x)


def test_torch_compile_runs_int8_modules():
    """torch.compile traces the int8 modules in one graph (the operator's fake kernel) and gives eager's
    outputs at other lengths; fed by an embedding outside torch.no_grad() the compiled forward runs and its
    compiled backward raises, as eager's does."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    q = rnnfast.quantize_dynamic(nn.Sequential(Stack(), nn.Identity()).eval())
    explained = torch._dynamo.explain(q)(torch.randn(5, 2, 4))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(q, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for T, B in [(5, 2), (7, 2), (3, 1)]:
            x = torch.randn(T, B, 4)
            torch.testing.assert_close(compiled(x), q(x), atol=0, rtol=0)
    tokens = torch.randint(0, 10, (6, 2))
    model = torch.compile(nn.Sequential(emb, q))
    out = model(tokens)
    torch.testing.assert_close(out, q(emb(tokens)), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="int8 recurrent modules .* cannot backpropagate"):
        torch.utils._pytree.tree_leaves(out)[0].sum().backward()


# ---- errors ---------------------------------------------------------------------

def test_unsupported_requests_raise():
    with pytest.raises(NotImplementedError, match="proj_size"):
        rnnfast.quantize_dynamic(nn.LSTM(4, 8, proj_size=3))
    with pytest.raises(NotImplementedError, match="qint8"):
        rnnfast.quantize_dynamic(nn.LSTM(4, 8), dtype=torch.float16)
    with pytest.raises(ValueError, match="torch.ao.quantization.quantize_dynamic"):
        rnnfast.quantize_dynamic(Net(), {nn.Linear})


@torch.no_grad()
def test_bad_inputs_raise_like_torch():
    q = rnnfast.quantize_dynamic(_float(nn.LSTM, 4, 8))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        q(torch.randn(3, 2, 5))
    with pytest.raises(RuntimeError, match="float32"):  # torch's: "expected scalar type Float but found Double"
        q(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        q(torch.randn(3))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        q(torch.randn(3, 2, 4), (torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        q(torch.randn(3, 2, 4), (torch.zeros(2, 8), torch.zeros(2, 8)))
    with pytest.raises(RuntimeError, match="^lstm expects two hidden states$"):
        q(torch.randn(3, 2, 4), (torch.zeros(1, 2, 8),) * 3)
    lstm_cell = rnnfast.quantize_dynamic(_float(nn.LSTMCell, 4, 8))
    with pytest.raises(RuntimeError, match="^lstm_cell expects two hidden states$"):
        lstm_cell(torch.randn(2, 4), (torch.zeros(2, 8),) * 3)
    cell = rnnfast.quantize_dynamic(_float(nn.GRUCell, 4, 8))
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D"):
        cell(torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError, match="doesn't match hidden0 batch size"):
        cell(torch.randn(2, 4), torch.zeros(3, 8))
    with pytest.raises(RuntimeError, match="inconsistent input_size"):
        cell(torch.randn(2, 5))


def test_training_through_int8_raises():
    """A call whose input or state autograd tracks runs, as torch's int8 layers' does (an embedding's output
    without torch.no_grad()), and gives the untracked call's outputs; a backward through it raises."""
    q = rnnfast.quantize_dynamic(_float(nn.LSTM, 4, 8, num_layers=2, dropout=0.2))
    x = torch.randn(3, 2, 4, requires_grad=True)
    out, (h_n, c_n) = q(x)
    with torch.no_grad():
        want, (want_h, want_c) = q(x)
    torch.testing.assert_close((out, h_n, c_n), (want, want_h, want_c), rtol=0, atol=0)
    for t in (out, h_n, c_n):
        with pytest.raises(RuntimeError, match="int8 recurrent modules .* cannot backpropagate"):
            t.sum().backward(retain_graph=True)
    packed = nn.utils.rnn.pack_padded_sequence(x, [3, 2])
    with pytest.raises(RuntimeError, match="cannot backpropagate"):
        q(packed)[0].data.sum().backward()
    with torch.no_grad():
        q.train()
        with pytest.raises(RuntimeError, match=r"call \.eval\(\)"):
            q(x)
    cell = rnnfast.quantize_dynamic(_float(nn.LSTMCell, 4, 8))
    h = torch.zeros(2, 8, requires_grad=True)
    h1, c1 = cell(torch.randn(2, 4), (h, h))
    with pytest.raises(RuntimeError, match="cannot backpropagate"):
        (h1 + c1).sum().backward()
