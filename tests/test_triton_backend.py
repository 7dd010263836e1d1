"""What is specific to the ``triton`` backend: step and sequence kernels agree,
the step kernels alone pass parity, awkward sizes (several row and hidden
tiles), dtype support, and on a GPU the full parity grid in float16/bfloat16."""

import os

import pytest
import torch

from conftest import DEVICE
from parity import LAYER_CASES, Case, check_cell, check_layer
from rnnfast.backend import RNNSpec, get_backend

triton_backend = pytest.importorskip("rnnfast.triton_backend")
if get_backend("triton").unavailable_reason() is not None:
    pytest.skip(f"triton backend unavailable: {get_backend('triton').unavailable_reason()}", allow_module_level=True)

from rnnfast.kernels import rnn_fwd, use_sequence_kernel  # noqa: E402
from rnnfast.kernels.utils import dot_precision  # noqa: E402

LOW_QUICK = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@pytest.fixture
def step_kernels():
    """Force the step kernels for layers (the sequence kernel is the default at small sizes)."""
    backend = get_backend("triton")
    backend.kernel = "step"
    yield
    backend.kernel = "auto"


def _weights(mode: str, I: int, H: int, P: int, bias: bool, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = GATES[mode]
    K = P or H

    def rnd(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) / H ** 0.5).to(device=device, dtype=dtype)

    return dict(w_ih=rnd(G * H, I), w_hh=rnd(G * H, K), b_ih=rnd(G * H) if bias else None,
                b_hh=rnd(G * H) if bias else None, w_hr=rnd(P, H) if P else None), K


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "T,B,I,H,P,bias,packed,reverse",
    [
        pytest.param(4, 3, 5, 7, 0, True, False, False, id="T4-B3-I5-H7"),
        pytest.param(5, 17, 3, 19, 0, False, True, True, id="T5-B17-H19-packed-reverse-nobias"),
        pytest.param(3, 2, 6, 33, 5, True, True, False, id="T3-B2-H33-P5-packed"),
    ],
)
def test_step_matches_sequence(mode, T, B, I, H, P, bias, packed, reverse):
    if P and mode != "LSTM":
        pytest.skip("proj_size is LSTM only")
    torch.manual_seed(0)
    w, K = _weights(mode, I, H, P, bias, torch.float32, DEVICE)
    x = torch.randn(T, B, I, device=DEVICE)
    h0 = torch.randn(B, K, device=DEVICE)
    c0 = torch.randn(B, H, device=DEVICE) if mode == "LSTM" else None
    bs = None
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (B,)).tolist(), reverse=True)
        lengths[0] = T
        bs = (torch.tensor(lengths).unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
    step = rnn_fwd(mode, x, h0, c0, **w, batch_sizes=bs, reverse=reverse, save=True, kernel="step")
    seq = rnn_fwd(mode, x, h0, c0, **w, batch_sizes=bs, reverse=reverse, save=True, kernel="sequence")
    for name, a, b in zip(step._fields, step, seq):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_kernel_choice():
    assert use_sequence_kernel("auto", 37, 37)
    assert use_sequence_kernel("auto", 128, 64)
    assert not use_sequence_kernel("auto", 130, 130)
    assert not use_sequence_kernel("auto", 64, 200)
    assert use_sequence_kernel("sequence", 1000, 1000)
    assert not use_sequence_kernel("step", 8, 8)
    # float32 dots are 3xTF32 (TF32 off) or TF32: the LSTM float32 backward runs the sequence kernel
    assert dot_precision(torch.float32) == "tf32x3"
    assert use_sequence_kernel("sequence", 8, 8, 0, torch.float32, backward=True)
    assert use_sequence_kernel("auto", 8, 8, 0, torch.bfloat16, backward=True)
    # the sequence kernel up to a padded hidden size of 128: 16-bit dtypes on a GPU, every dtype
    # under the interpreter (float32/float64 take the step kernels on a GPU, where they were faster)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        on_seq = dtype in (torch.float16, torch.bfloat16) or os.environ.get("TRITON_INTERPRET") == "1"
        assert use_sequence_kernel("auto", 128, 128, 1, dtype, backward=True) == on_seq
        assert use_sequence_kernel("auto", 100, 37, 0, dtype) == on_seq
        assert not use_sequence_kernel("auto", 130, 130, 0, dtype, backward=True)
        assert not use_sequence_kernel("auto", 256, 256, 1, dtype)
    with pytest.raises(ValueError, match="kernel must be"):
        use_sequence_kernel("fast", 8, 8)


STEP_CASES = [
    ("LSTM", Case("step-packed-bidir-layers2", dict(bidirectional=True, num_layers=2), packed="unsorted", B=4, T=5)),
    ("LSTM", Case("step-proj-bidir-packed", dict(proj_size=5, bidirectional=True), packed="unsorted", B=4, T=5)),
    ("LSTM", Case("step-no-bias-no-state", dict(bias=False), with_state=False)),
    ("GRU", Case("step-packed-bidir", dict(bidirectional=True), packed="unsorted", B=5, T=5)),
    ("GRU", Case("step-no-bias-layers2", dict(bias=False, num_layers=2))),
    ("RNN", Case("step-packed-bidir-relu", dict(bidirectional=True, nonlinearity="relu"), packed="sorted", B=4, T=5)),
    ("RNN", Case("step-tanh-no-bias", dict(bias=False))),
]


@pytest.mark.parametrize("family,case", [pytest.param(f, c, id=f"{f}-{c.id}") for f, c in STEP_CASES])
def test_step_kernels_parity(step_kernels, family, case):
    check_layer(family, case, "triton", torch.float32, DEVICE)


ODD_CASES = [
    # two row tiles (B > 16), two hidden tiles and a K loop (H > 64)
    ("LSTM", Case("odd-B17-H70", I=3, H=70, T=2, B=17)),
    ("LSTM", Case("odd-proj-H70-P66", dict(proj_size=66), I=5, H=70, T=2, B=3)),
    ("GRU", Case("odd-B18-H65-packed", I=2, H=65, T=3, B=18, packed="unsorted")),
    ("RNN", Case("odd-H129-relu", dict(nonlinearity="relu"), I=9, H=129, T=2, B=2)),
]


@pytest.mark.parametrize("family,case", [pytest.param(f, c, id=f"{f}-{c.id}") for f, c in ODD_CASES])
def test_odd_sizes(family, case):
    check_layer(family, case, "triton", torch.float32, DEVICE)


@pytest.mark.parametrize("family,case", [pytest.param(f, c, id=f"{f}-seq-{c.id}") for f, c in ODD_CASES[:3]])
def test_odd_sizes_sequence_kernel(family, case):
    backend = get_backend("triton")
    backend.kernel = "sequence"
    try:
        check_layer(family, case, "triton", torch.float32, DEVICE)
    finally:
        backend.kernel = "auto"


@pytest.mark.parametrize("family,case,dtype,kernel", [
    # the sequence kernel forced past the "auto" threshold (256- and 512-wide tiles) stays exact
    ("GRU", Case("seq256-H130-packed", I=3, H=130, T=3, B=3, packed="unsorted"), torch.float16, "sequence"),
    ("LSTM", Case("seq256-H200-B17", I=4, H=200, T=2, B=17), torch.float16, "sequence"),
    ("RNN", Case("seq256-H256-relu", dict(nonlinearity="relu"), I=5, H=256, T=2, B=2), torch.float16, "sequence"),
    ("GRU", Case("seq-H257", I=3, H=257, T=2, B=2), torch.float32, "sequence"),
], ids=lambda v: v.id if isinstance(v, Case) else str(v).replace("torch.", ""))
def test_sequence_kernel_large_hidden(family, case, dtype, kernel):
    """The sequence kernel forced at hidden sizes 129-257 (masking of a 256- or 512-wide tile).
    Interpreter only: such tiles need more shared memory than a GPU has for float32."""
    if DEVICE == "cuda":
        pytest.skip("interpreter check of the tile masking: tiles this wide exceed a GPU's shared memory")
    backend = get_backend("triton")
    backend.kernel = kernel
    try:
        check_layer(family, case, "triton", dtype, DEVICE)
    finally:
        backend.kernel = "auto"


@pytest.mark.parametrize("dtype", LOW_QUICK)
@pytest.mark.parametrize("family,case", [
    ("LSTM", Case("lowp-proj-bidir-packed", dict(proj_size=5, bidirectional=True), packed="unsorted", B=4, T=5)),
    ("GRU", Case("lowp-packed", packed="sorted", B=4, T=5)),
    ("RNN", Case("lowp-relu-layers2", dict(nonlinearity="relu", num_layers=2))),
], ids=lambda v: v.id if isinstance(v, Case) else v)
def test_low_precision(family, case, dtype):
    """float16/bfloat16 against float32 torch.nn at 2e-2 (bfloat16 is GPU only)."""
    check_layer(family, case, "triton", dtype, DEVICE)


def test_unsupported_dtype():
    spec = RNNSpec("LSTM", 3, 4)
    why = get_backend("triton").unsupported_reason(spec, torch.empty(0, dtype=torch.int32, device=DEVICE), False)
    assert why is not None and "int32" in why


# ---- GPU: the whole parity grid (slow cases included) in low precision -------------------------

GPU_GRID = [pytest.param(family, case, id=f"{family}-{case.id}") for family, cases in LAYER_CASES.items()
            for case in cases]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", LOW_QUICK)
@pytest.mark.parametrize("family,case", GPU_GRID)
def test_gpu_low_precision(family, case, dtype):
    check_layer(family, case, "triton", dtype, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", LOW_QUICK)
@pytest.mark.parametrize("family", ["LSTMCell", "GRUCell", "RNNCell"])
def test_gpu_cells_low_precision(family, dtype):
    check_cell(family, Case("cell", B=4), "triton", dtype, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["step", "sequence"])
@pytest.mark.parametrize("family,case", [
    ("LSTM", Case("gpu-B300-H96", dict(num_layers=2, bidirectional=True), I=40, H=96, T=20, B=300)),
    ("LSTM", Case("gpu-proj-B70", dict(proj_size=48), I=16, H=100, T=12, B=70, packed="unsorted")),
    ("GRU", Case("gpu-B130-H128", I=24, H=128, T=16, B=130, packed="unsorted")),
    ("RNN", Case("gpu-B65-H127", dict(nonlinearity="relu"), I=24, H=127, T=16, B=65)),
], ids=lambda v: v.id if isinstance(v, Case) else v)
def test_gpu_kernels_larger(family, case, kernel):
    backend = get_backend("triton")
    backend.kernel = kernel
    try:
        for dtype in (torch.float32, torch.bfloat16):
            check_layer(family, case, "triton", dtype, "cuda")
    finally:
        backend.kernel = "auto"


@pytest.mark.gpu
@gpu
def test_gpu_step_kernels_large_hidden():
    check_layer("LSTM", Case("gpu-H300", dict(num_layers=2), I=64, H=300, T=10, B=33), "triton", torch.float32,
                "cuda")
    check_layer("GRU", Case("gpu-H257", I=64, H=257, T=10, B=9, packed="unsorted"), "triton", torch.bfloat16, "cuda")


def test_prebound_arguments():
    """What a pre-bound step launch replays (GPU only) is what Triton's launcher binds: every
    kernel parameter in order, the heuristics' flags and the chosen config's block sizes."""
    from rnnfast.kernels.step import rnn_fwd_step_kernel
    from rnnfast.kernels.utils import aligned_by_time, full_arguments

    B, H, K = 3, 5, 5
    f32 = dict(dtype=torch.float32, device=DEVICE)
    args = (torch.zeros(B, 4 * H, **f32), torch.zeros(B, K, **f32), torch.zeros(B, H, **f32),
            torch.zeros(4 * H, K, **f32), None, torch.zeros(B, K, **f32), torch.zeros(B, H, **f32), None, None,
            B, B, H, K)
    consts = dict(MODE=0, NG=4, NS=4, IS_FP64=False, PRECISION="ieee")
    rnn_fwd_step_kernel[lambda meta: (1, 1)](*args, **consts)  # chooses the config, as a first launch does
    named = full_arguments(rnn_fwd_step_kernel, args, consts)
    assert list(named) == rnn_fwd_step_kernel.fn.fn.arg_names
    assert named["HAS_BIAS"] is False and named["HAS_PROJ"] is False and named["SAVE"] is False
    assert named["BLOCK_B"] == rnn_fwd_step_kernel.best_config.kwargs["BLOCK_B"]
    assert list(named.values())[:len(args)] == list(args)
    # per-time views stay 16-byte aligned when the time stride is a multiple of 16 bytes
    assert aligned_by_time(torch.zeros(3, 2, 4, **f32), None)
    assert not aligned_by_time(torch.zeros(3, 1, 3, **f32))


def _op_args(mode: str = "LSTM", P: int = 0, packed: bool = False) -> dict:
    """A valid rnnfast::triton_layer_fwd call (T 4, B 3, I 5, H 6; lengths 3, 2, 2, 1 when packed)."""
    g = torch.Generator().manual_seed(0)
    G, H, K = GATES[mode], 6, P or 6
    rnd = lambda *shape: torch.randn(shape, generator=g).to(DEVICE)  # noqa: E731
    return dict(x=rnd(4, 3, 5), h0=rnd(3, K), c0=rnd(3, H) if mode == "LSTM" else None, w_ih=rnd(G * H, 5),
                w_hh=rnd(G * H, K), b_ih=rnd(G * H), b_hh=rnd(G * H), w_hr=rnd(P, H) if P else None,
                batch_sizes=torch.tensor([3, 2, 2, 1]) if packed else None, mode=mode, reverse=False, save=True,
                kernel="auto")


OP_CASES = [
    ("mode", "GRU", 0, lambda a: a.update(mode="gru"), "unknown mode 'gru'"),
    ("kernel", "GRU", 0, lambda a: a.update(kernel="fast"), "unknown kernel 'fast'"),
    ("x-2d", "LSTM", 0, lambda a: a.update(x=a["x"][0]), "input must be 3-D"),
    ("no-rows", "GRU", 0, lambda a: a.update(x=a["x"][:, :0], h0=a["h0"][:0]), "no steps or no rows"),
    ("w_hh-rows", "LSTM", 0, lambda a: a.update(w_hh=a["w_hh"][1:]), "positive multiple of 4"),
    ("w_ih-cols", "GRU", 0, lambda a: a.update(w_ih=a["w_ih"][:, 1:]), r"weight_ih has shape \[18, 4\]"),
    ("h0-shape", "RNN_TANH", 0, lambda a: a.update(h0=a["h0"][1:]), r"h0 has shape \[2, 6\], expected \[3, 6\]"),
    ("c0-missing", "LSTM", 0, lambda a: a.update(c0=None), "c0 must be given for LSTM"),
    ("c0-for-gru", "GRU", 0, lambda a: a.update(c0=a["h0"]), "c0 must be given for LSTM and only for LSTM"),
    ("bias-one", "LSTM", 0, lambda a: a.update(b_hh=None), "both be given or both be None"),
    ("bias-shape", "GRU", 0, lambda a: a.update(b_ih=a["b_ih"][1:]), "bias_ih has shape"),
    ("proj-gru", "GRU", 0, lambda a: a.update(w_hr=torch.zeros(2, 6)), "only supported for LSTM"),
    ("proj-shape", "LSTM", 2, lambda a: a.update(w_hr=a["w_hr"][:, 1:]), "weight_hr has shape"),
    ("dtype", "RNN_RELU", 0, lambda a: a.update(w_hh=a["w_hh"].double()), "weight_hh has dtype torch.float64"),
    ("int-input", "GRU", 0, lambda a: a.update(**{k: a[k].long() for k in ("x", "h0", "w_ih", "w_hh", "b_ih",
                                                                          "b_hh")}), "input has dtype torch.int64"),
    ("device", "GRU", 0, lambda a: a.update(h0=a["h0"].to("meta")), "h0 is on meta"),
    ("lengths-count", "LSTM", 0, lambda a: a.update(batch_sizes=torch.tensor([3, 2, 1])), "one entry per step"),
    ("lengths-rising", "GRU", 0, lambda a: a.update(batch_sizes=torch.tensor([2, 3, 1, 1])), "non-increasing"),
    ("lengths-past-batch", "LSTM", 0, lambda a: a.update(batch_sizes=torch.tensor([4, 2, 2, 1])), "non-increasing"),
    ("lengths-zero", "RNN_TANH", 0, lambda a: a.update(batch_sizes=torch.tensor([3, 2, 0, 0])), "between 1 and"),
]


@pytest.mark.parametrize("mode, P, edit, match", [pytest.param(*c[1:], id=c[0]) for c in OP_CASES])
def test_operator_bad_call(mode, P, edit, match):
    """Direct calls of rnnfast::triton_layer_fwd with bad arguments: a RuntimeError naming the argument."""
    args = _op_args(mode, P, packed=True)
    torch.ops.rnnfast.triton_layer_fwd(**args)  # valid as built
    edit(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.rnnfast.triton_layer_fwd(**args)


def test_operator_bad_backward_call():
    """triton_layer_bwd refuses saved buffers that are not its forward's."""
    args = _op_args("LSTM", packed=True)
    hs, cs, ms, gs = torch.ops.rnnfast.triton_layer_fwd(**args)
    dout = torch.randn(4, 3, 6, device=DEVICE)
    call = dict(dout=dout, dh_n=torch.zeros_like(args["h0"]), dc_n=torch.zeros_like(args["c0"]), x=args["x"], hs=hs,
                cs=cs, ms=None, gs=gs, w_ih=args["w_ih"], w_hh=args["w_hh"], w_hr=None, has_bias=True,
                batch_sizes=args["batch_sizes"], mode="LSTM", reverse=False, kernel="auto")
    torch.ops.rnnfast.triton_layer_bwd(**call)
    with pytest.raises(RuntimeError, match="gs must be what triton_layer_fwd saved"):
        torch.ops.rnnfast.triton_layer_bwd(**{**call, "gs": gs[1:]})
    with pytest.raises(RuntimeError, match=r"grad_out has shape \[3, 3, 6\]"):
        torch.ops.rnnfast.triton_layer_bwd(**{**call, "dout": dout[1:]})
