"""Drop-in API: isinstance, state_dict, convert(), serialisation, the backend registry."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import rnnfast
from conftest import backend_device
from rnnfast.backend import Backend, BackendFallbackWarning, get_backend, register_backend, resolve

FAMILIES = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


@pytest.mark.parametrize("name", FAMILIES)
def test_subclass_names_and_init(name):
    torch.manual_seed(0)
    ref = getattr(nn, name)(6, 10)
    torch.manual_seed(0)
    ours = getattr(rnnfast, name)(6, 10)
    assert isinstance(ours, getattr(nn, name))
    assert ours.backend == "auto"
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n  # same initialisation from the same seed


def _run(module, x):
    """The first output tensor: the layer's output, or the cell's (first) state."""
    out = module(x)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_round_trip(name):
    ref = getattr(nn, name)(6, 10)
    ours = getattr(rnnfast, name)(6, 10, backend="reference")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6) if "Cell" in name else torch.randn(4, 3, 6)
    want = _run(ref, x)
    back = getattr(nn, name)(6, 10)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(_run(ours, x), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_run(back, x), want, atol=0, rtol=0)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.blocks = nn.ModuleList([nn.GRU(16, 6), nn.Sequential(nn.Linear(6, 6), nn.RNN(6, 4, nonlinearity="relu"))])
        self.cells = nn.ModuleDict({"l": nn.LSTMCell(4, 3), "g": nn.GRUCell(3, 3), "r": nn.RNNCell(3, 2)})

    def forward(self, x):
        y, _ = self.enc(x)
        y, _ = self.blocks[0](y.transpose(0, 1))
        y, _ = self.blocks[1][1](self.blocks[1][0](y))
        h, _ = self.cells["l"](y[-1])
        return self.cells["r"](self.cells["g"](h))


def test_convert_nested_model_in_place():
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(2, 7, 5)
    want = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert rnnfast.convert(model, backend="reference") is model
    for sub in model.modules():
        if isinstance(sub, (nn.RNNBase, nn.RNNCellBase)):
            assert type(sub).__module__ == "rnnfast.modules" and sub.backend == "reference"
    assert {n: p for n, p in model.named_parameters()} == params_before  # same Parameter objects
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    model(x).sum().backward()
    opt.step()  # the optimizer still holds the (same) parameters
    assert not torch.allclose(model(x), want)


def test_convert_root_and_leaves_subclasses_alone():
    class MyLSTM(nn.LSTM):
        pass

    root = nn.GRU(3, 4)
    assert isinstance(rnnfast.convert(root), rnnfast.GRU)
    custom = nn.Sequential(MyLSTM(3, 4))
    rnnfast.convert(custom)
    assert type(custom[0]) is MyLSTM


class _Half(nn.Module):
    def forward(self, w):
        return 0.5 * w


# weight re-parametrizations users put on recurrent layers and cells, and how (layer, cell)
REPARAMETRIZE = {
    # a stateful parametrization: one power-iteration step per read of the weight in training
    "spectral_norm": lambda m, names: [nn.utils.parametrizations.spectral_norm(m, n) for n in names],
    "weight_norm": lambda m, names: [nn.utils.parametrizations.weight_norm(m, n) for n in names],
    "old_weight_norm": lambda m, names: [nn.utils.weight_norm(m, n) for n in names],  # a forward pre-hook
    "prune": lambda m, names: [prune.l1_unstructured(m, n, amount=0.4) for n in names],
    "custom": lambda m, names: [nn.utils.parametrize.register_parametrization(m, n, _Half()) for n in names],
}


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated")
@pytest.mark.parametrize("how", REPARAMETRIZE)
def test_reparametrized_weights(backend, how):
    """convert() turns parametrized (and pruned, weight-normed) layers and cells into rnnfast ones, which
    read their weights as often as torch.nn's do: three SGD steps end where torch.nn's end."""
    device = backend_device(backend)

    def build():
        torch.manual_seed(0)
        lstm, cell = nn.LSTM(5, 8, num_layers=2), nn.GRUCell(8, 8)
        REPARAMETRIZE[how](lstm, ["weight_hh_l0", "weight_hh_l1"])
        REPARAMETRIZE[how](cell, ["weight_hh"])
        return nn.ModuleList([lstm, cell]).to(device)

    ref, ours = build(), rnnfast.convert(build(), backend=backend)
    assert isinstance(ours[0], rnnfast.LSTM) and isinstance(ours[1], rnnfast.GRUCell)
    x = torch.randn(7, 3, 5, device=device)
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            y, _ = model[0](x)
            (y.square().sum() + model[1](y[-1]).square().sum()).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if how in ("spectral_norm", "weight_norm", "custom"):  # removing the last parametrization gives rnnfast's class
        nn.utils.parametrize.remove_parametrizations(ours[1], "weight_hh")
        assert type(ours[1]) is rnnfast.GRUCell


@pytest.mark.parametrize("name", FAMILIES)
def test_deepcopy_pickle_to_double(name):
    ours = getattr(rnnfast, name)(6, 10, backend="reference")
    x = torch.randn(3, 6) if "Cell" in name else torch.randn(4, 3, 6)
    want = _run(ours, x)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert clone.backend == "reference"
        torch.testing.assert_close(_run(clone, x), want, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    torch.testing.assert_close(_run(torch.load(buf, weights_only=False), x), want, atol=0, rtol=0)
    d = copy.deepcopy(ours).double()
    assert _run(d, x.double()).dtype == torch.float64
    m = getattr(rnnfast, name)(6, 10, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_meta_device(name):
    """On the meta device (shape inference, deferred initialisation) forward and backward give torch.nn's
    shapes, as torch.nn's layers do: autocast has no meta device to ask about."""
    cell = name.endswith("Cell")
    kwargs = {} if cell else {"num_layers": 2, "bidirectional": True}
    x = torch.randn(*(() if cell else (7,)), 3, 5, device="meta")
    shapes = []
    for module in (getattr(nn, name), getattr(rnnfast, name)):
        m = module(5, 4, **kwargs).to("meta")
        out = m(x)
        leaves = torch.utils._pytree.tree_leaves(out)
        leaves[0].sum().backward()
        assert all(t.device.type == "meta" for t in leaves)
        shapes.append(([t.shape for t in leaves], [p.grad.shape for p in m.parameters()]))
    assert shapes[0] == shapes[1]


def test_weights_replaced_by_assignment_are_used():
    lstm = rnnfast.LSTM(3, 4, backend="reference")
    x = torch.randn(2, 1, 3)
    before = lstm(x)[0]
    lstm.weight_hh_l0 = nn.Parameter(torch.zeros_like(lstm.weight_hh_l0))
    lstm.weight_ih_l0 = nn.Parameter(torch.zeros_like(lstm.weight_ih_l0))
    after = lstm(x)[0]
    assert not torch.allclose(before, after)
    ref = nn.LSTM(3, 4)
    ref.load_state_dict(lstm.state_dict())
    torch.testing.assert_close(after, ref(x)[0])


def test_functional_call_uses_given_weights():
    lstm = rnnfast.GRU(3, 4, backend="reference")
    x = torch.randn(2, 1, 3)
    zeros = {n: torch.zeros_like(p) for n, p in lstm.named_parameters()}
    out, _ = torch.func.functional_call(lstm, zeros, (x,))
    assert torch.count_nonzero(out) == 0


def test_repr_mentions_explicit_backend():
    assert "backend" not in repr(rnnfast.LSTM(3, 4))
    assert "backend='reference'" in repr(rnnfast.LSTM(3, 4, backend="reference"))
    assert "backend='reference'" in repr(rnnfast.GRUCell(3, 4, backend="reference"))


def test_available_backends_lists_reference():
    names = rnnfast.available_backends()
    assert names[0] == "reference"
    assert set(names) <= set(rnnfast.registered_backends())


class _NoBidirBackend(Backend):
    """A toy backend for registry tests: delegates to reference, refuses bidirectional."""

    name = "test-nobidir"

    def unsupported_reason(self, spec, x, packed):
        return "bidirectional" if spec.bidirectional else None

    def rnn(self, *args):
        self.calls += 1
        return get_backend("reference").rnn(*args)

    calls = 0


def test_explicit_backend_falls_back_with_one_warning():
    register_backend("test-nobidir", _NoBidirBackend)
    try:
        plain = rnnfast.LSTM(3, 4, backend="test-nobidir")
        plain(torch.randn(2, 1, 3))
        assert get_backend("test-nobidir").calls == 1
        bidir = rnnfast.LSTM(3, 4, bidirectional=True, backend="test-nobidir")
        with pytest.warns(BackendFallbackWarning, match="test-nobidir.*bidirectional.*reference"):
            bidir(torch.randn(2, 1, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bidir(torch.randn(2, 1, 3))  # warned once only
        assert get_backend("test-nobidir").calls == 1
    finally:
        rnnfast.backend._REGISTRY.pop("test-nobidir")
        rnnfast.backend._INSTANCES.pop("test-nobidir", None)


def test_environment_overrides_layer_choice(monkeypatch):
    spec = rnnfast.RNNSpec("LSTM", 3, 4)
    x = torch.randn(2, 1, 3)
    monkeypatch.setenv(rnnfast.ENV_VAR, "reference")
    assert resolve("auto", spec, x, False).name == "reference"


def test_auto_picks_a_usable_backend():
    spec = rnnfast.RNNSpec("GRU", 3, 4)
    chosen = resolve("auto", spec, torch.randn(2, 1, 3), False)
    assert chosen.name in rnnfast.available_backends()
    assert chosen.unsupported_reason(spec, torch.randn(2, 1, 3), False) is None


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_non_contiguous_inputs_and_states(backend, name):
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = getattr(nn, name)(5, 6, num_layers=2).to(device)
    ours = getattr(rnnfast, name)(5, 6, num_layers=2, backend=backend).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 10, 4, device=device)[:, ::2, :].transpose(0, 1)  # (5, 3, 4) strided
    x = torch.cat([x, x[..., :1]], dim=-1)[..., [0, 2, 1, 4, 3]]  # (5, 3, 5), permuted features
    h = torch.randn(3, 2, 6, device=device).transpose(0, 1)
    hx = (h, torch.randn(2, 6, 3, device=device).transpose(1, 2)) if name == "LSTM" else h
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN refuses a non-contiguous hx
        want = ref(x, hx)
    got = ours(x, hx)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_resolved_backend_names_the_backend_that_runs():
    lstm = rnnfast.LSTM(3, 4, backend="reference")
    assert lstm.resolved_backend(torch.randn(2, 1, 3)) == "reference"
    auto = rnnfast.GRU(3, 4)
    assert auto.resolved_backend(torch.randn(2, 1, 3)) in rnnfast.available_backends()


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_empty_batch(backend, name):
    device = backend_device(backend)
    ref = getattr(nn, name)(4, 5, num_layers=2, bidirectional=True).to(device)
    ours = getattr(rnnfast, name)(4, 5, num_layers=2, bidirectional=True, backend=backend).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 0, 4, device=device, requires_grad=True)
    want, got = ref(x), ours(x)
    assert got[0].shape == want[0].shape == (3, 0, 10)
    got[0].sum().backward()
    assert x.grad.shape == x.shape
    cell = getattr(rnnfast, name + "Cell")(4, 5, backend=backend).to(device)
    out = cell(torch.randn(0, 4, device=device))
    assert (out[0] if name == "LSTM" else out).shape == (0, 5)


# Backends whose second derivatives are exact: reference (autograd through torch ops), and cpu, whose
# backward reruns the reference loop when asked for a graph (saying so).
SECOND_ORDER = ("reference", "cpu")


def test_double_backward_works_or_raises(backend, monkeypatch):
    """Second derivatives, as torch.nn's layers take them: exact on reference and cpu, a clear error on the
    other fused backends."""
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = nn.GRU(3, 4).double().to(device)
    ours = rnnfast.GRU(3, 4, backend=backend).double().to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 3, dtype=torch.float64, device=device, requires_grad=True)

    def second(module):
        g, = torch.autograd.grad(module(x)[0].square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    if backend in SECOND_ORDER:
        monkeypatch.setattr(rnnfast.backend, "_WARNED", set())  # warned once a process: again here
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(second(ours), second(ref))
        said = any("double backward" in str(w.message) for w in caught if issubclass(w.category, BackendFallbackWarning))
        assert said == (backend != "reference")
        return
    # never a silently wrong second derivative: each fused backend's own error
    with pytest.raises(NotImplementedError, match=f"rnnfast {backend} backend: double backward .* not supported; "
                       "use backend='reference'"):
        second(ours)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell", "RNNCell"])
def test_forward_ad_tangents(backend, name, grad, monkeypatch):
    """Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) carries torch.nn's tangents, with or
    without grad mode: the fused backends have no forward derivative and hand such calls to reference,
    saying so."""
    import torch.autograd.forward_ad as fwAD

    device = backend_device(backend)
    torch.manual_seed(0)
    ref = getattr(nn, name)(3, 4).double().to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(*(() if name.endswith("Cell") else (5,)), 2, 3, dtype=torch.float64, device=device)
    dx = torch.randn_like(x)

    def tangents(module):
        with fwAD.dual_level(), torch.set_grad_enabled(grad):
            out = module(fwAD.make_dual(x, dx))
            return [tuple(fwAD.unpack_dual(t)) for t in torch.utils._pytree.tree_leaves(out)]

    want = tangents(ref)
    monkeypatch.setattr(rnnfast.backend, "_WARNED", set())  # warned once a process: again here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = tangents(ours)
    assert len(got) == len(want) and all(t is not None for _, t in got)
    torch.testing.assert_close(got, want)
    fell_back = [w for w in caught if issubclass(w.category, BackendFallbackWarning)]
    assert (backend == "reference") != any("forward-mode AD" in str(w.message) for w in fell_back)

    def first(module):  # torch.func.jvp enters a dual level too
        return lambda inp: torch.utils._pytree.tree_leaves(module(inp))[0]

    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        torch.testing.assert_close(torch.func.jvp(first(ours), (x,), (dx,)), torch.func.jvp(first(ref), (x,), (dx,)))


@pytest.mark.parametrize("name", ["LSTM", "GRUCell"])
def test_torch_func_grad(backend, name):
    """torch.func.grad through functional_call, as with torch.nn's layers; a second derivative
    (torch.func.grad of it) works on reference and cpu and raises clearly on the other fused backends."""
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = getattr(nn, name)(3, 4).double().to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    x = x[0] if name.endswith("Cell") else x

    def loss(model, params, inp):
        out = torch.func.functional_call(model, params, (inp,))
        return (out if isinstance(out, torch.Tensor) else out[0]).square().sum()

    params = dict(ref.named_parameters())
    want = torch.func.grad(lambda p: loss(ref, p, x))(params)
    got = torch.func.grad(lambda p: loss(ours, p, x))(params)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=lambda m: f"{n}: {m}")
    second = torch.func.grad(lambda inp: torch.func.grad(lambda i: loss(ours, params, i))(inp).sum())
    if backend in SECOND_ORDER:
        torch.testing.assert_close(second(x), torch.func.grad(
            lambda inp: torch.func.grad(lambda i: loss(ref, params, i))(inp).sum())(x))
    else:
        with pytest.raises(NotImplementedError, match=f"rnnfast {backend} backend: double backward"):
            second(x)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell", "RNNCell"])
def test_torch_func_vjp_jacrev_vmap(backend, name):
    """torch.func's other transforms: a vjp function called after ``torch.func.vjp`` returned (its
    transform over, as ``jacrev`` calls it under vmap) gives torch.nn's vector-Jacobian products, where
    the fused backward once found no graph and returned zeros; ``jacrev`` matches torch.nn's; ``vmap`` over
    inputs (batched or unbatched sequences), and over the stacked weights of an ensemble, gives each sample's
    own call (torch.nn's layers have no batching rule; its GRU and Elman cells do, and match)."""
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = getattr(nn, name)(3, 4).double().to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    cell = name.endswith("Cell")
    x = torch.randn(*(() if cell else (5,)), 2, 3, dtype=torch.float64, device=device)

    def first(module):
        return lambda inp: torch.utils._pytree.tree_leaves(module(inp))[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks to reference, vmap's per-sample loop over the extension's ops
        want_out, want_vjp = torch.func.vjp(first(ref), x)
        got_out, got_vjp = torch.func.vjp(first(ours), x)
        cotangent = torch.randn_like(want_out)
        torch.testing.assert_close(got_out, want_out)
        torch.testing.assert_close(got_vjp(cotangent), want_vjp(cotangent))
        torch.testing.assert_close(torch.func.jacrev(first(ours))(x), torch.func.jacrev(first(ref))(x))

        xs = torch.stack([x, 2 * x, -x])
        torch.testing.assert_close(torch.func.vmap(first(ours))(xs), torch.stack([first(ours)(xi) for xi in xs]))
        torch.testing.assert_close(torch.func.vmap(first(ours))(xs), torch.stack([first(ref)(xi) for xi in xs]))
        if name in ("GRUCell", "RNNCell"):
            torch.testing.assert_close(torch.func.vmap(first(ours))(xs), torch.func.vmap(first(ref))(xs))
        if not cell:  # unbatched sequences, (T, input_size) each
            xu = xs[:, :, 0]
            torch.testing.assert_close(torch.func.vmap(first(ours))(xu), torch.stack([first(ref)(xi) for xi in xu]))

        models = [copy.deepcopy(ours) for _ in range(3)]
        for i, m in enumerate(models):
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1 + 0.1 * i)
        params, buffers = torch.func.stack_module_state(models)
        ensemble = torch.func.vmap(lambda p, b: first(lambda inp: torch.func.functional_call(ours, (p, b), (inp,)))(x))
        torch.testing.assert_close(ensemble(params, buffers), torch.stack([first(m)(x) for m in models]))


def _layers_id(v) -> str:
    return v if isinstance(v, str) else f"{v.get('num_layers', 1)}-layer" + ("-bidir" if v.get("bidirectional") else "")


@pytest.mark.parametrize("name, kwargs", [(n, {}) for n in FAMILIES] + [
    (n, dict(num_layers=2, bidirectional=bidir)) for n in FAMILIES if not n.endswith("Cell") for bidir in (False, True)
], ids=_layers_id)
def test_outputs_changed_in_place(backend, name, kwargs):
    """An output changed in place before backward (``out += residual``, an in-place activation) gives the
    gradients of the same change made out of place: never an error torch.nn does not raise (its float64
    layers here allow every such change; its float32 LSTM refuses one to its output), never a wrong
    gradient. (The cpu backend's backward reads a lower layer's output, and a bidirectional layer's halves,
    as they are: no user holds them.)"""
    device = backend_device(backend)
    cell = name.endswith("Cell")
    torch.manual_seed(0)
    ref = getattr(nn, name)(3, 4, **kwargs).double().to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(*(() if cell else (5,)), 2, 3, dtype=torch.float64, device=device)

    def grads(module, which, in_place):
        inp = x.clone().requires_grad_()
        outs = list(torch.utils._pytree.tree_leaves(module(inp)))
        if in_place:
            outs[which].mul_(2)
        else:
            outs[which] = outs[which] * 2
        sum(o.sum() for o in outs).backward()
        return [inp.grad] + [p.grad for p in module.parameters()]

    n_outputs = len(torch.utils._pytree.tree_leaves(ref(x)))
    for which in range(n_outputs):
        for m in (ref, ours):
            m.zero_grad()
        want = grads(ref, which, False)
        try:
            torch_allows = grads(copy.deepcopy(ref), which, True) is not None
        except RuntimeError:
            torch_allows = False
        try:
            got = grads(ours, which, True)
        except RuntimeError as e:
            assert not torch_allows, f"output {which}: torch.nn allows the change, rnnfast raised {e}"
            continue
        torch.testing.assert_close(got, want, msg=lambda m: f"output {which}: {m}")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(backend, use_reentrant):
    """torch.utils.checkpoint recomputes the layer in backward and gives torch.nn's gradients; the
    non-reentrant form also refuses a backward that unpacks its saved tensors twice."""
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, num_layers=2, bidirectional=True).double().to(device)
    ours = rnnfast.convert(copy.deepcopy(ref), backend=backend)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)

    def grads(model):  # the reentrant form takes .backward(), not autograd.grad
        inp = x.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(lambda i: model(i)[0], inp, use_reentrant=use_reentrant)
        out.square().sum().backward()
        return out, inp.grad, [p.grad for p in model.parameters()]

    torch.testing.assert_close(grads(ours), grads(ref))
