"""The persistent kernels (``rnnfast.kernels.persistent``) under the Triton interpreter:
several hidden slices (``P_h >= 2``, one launch per step: the launch boundary is the
barrier) and batch groups, odd sizes, packed, reversed, bidirectional and stacked layers,
outputs and every gradient against the sequence kernel, torch.nn and the reference;
and one single launch with ``P_h == 1`` that runs the step counters' arithmetic."""

import pytest
import torch

from conftest import DEVICE
from parity import Case, check_layer
from rnnfast.backend import get_backend

if get_backend("triton").unavailable_reason() is not None:
    pytest.skip(f"triton backend unavailable: {get_backend('triton').unavailable_reason()}", allow_module_level=True)

from rnnfast.kernels import choose_kernel, persistent_config  # noqa: E402
from rnnfast.kernels.persistent import MAX_AUTO_UNITS, MAX_PROGRAMS, PersistentConfig, persistent_bwd, persistent_fwd  # noqa: E402
from rnnfast.kernels.sequence import sequence_bwd, sequence_fwd  # noqa: E402
from rnnfast.kernels.utils import GRU, LSTM, MODE_ID, NUM_GATES  # noqa: E402


def _inputs(mode: int, T: int, B: int, H: int, packed: bool, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = NUM_GATES[mode]

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)

    bs = None
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (B,), generator=g).tolist(), reverse=True)
        lengths[0] = T
        bs = (torch.tensor(lengths).unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1)
    gx, w, b = rnd(T, B, G * H), rnd(G * H, H, scale=H ** -0.5), rnd(G * H)
    h0, c0 = rnd(B, H), rnd(B, H) if mode == LSTM else None
    dout = rnd(T, B, H)
    if bs is not None:
        dout = dout * (torch.arange(B).unsqueeze(0) < bs.unsqueeze(1)).unsqueeze(-1).to(DEVICE)
    dh_n, dc_n = rnd(B, H), rnd(B, H) if mode == LSTM else None
    return gx, w, b, h0, c0, bs, dout, dh_n, dc_n


def _compare_kernels(mode: int, T: int, B: int, H: int, packed: bool, reverse: bool, dtype,
                     cfg: PersistentConfig, sync=None):
    """Persistent forward and backward against the sequence kernel: every buffer either writes."""
    gx, w, b, h0, c0, bs, dout, dh_n, dc_n = _inputs(mode, T, B, H, packed, dtype)
    want = sequence_fwd(mode, gx, h0, c0, w, b, None, bs, reverse, True)
    got = persistent_fwd(mode, gx, h0, c0, w, b, bs, reverse, True, cfg=cfg, sync=sync)
    for name, a, e in zip(want._fields, got, want):
        if e is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, e, msg=lambda m: f"forward {name}: {m}")
    want_b = sequence_bwd(mode, dout, dh_n, dc_n, want, w, None, bs, reverse)
    got_b = persistent_bwd(mode, dout, dh_n, dc_n, got, w, bs, reverse, cfg=cfg, sync=sync)
    for name, a, e in zip(("dgi", "dgh", "dhs", "dh0", "dc0"), got_b, want_b):
        if name != "dhs" and e is not None:
            torch.testing.assert_close(a, e, msg=lambda m: f"backward {name}: {m}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("T,B,H,packed,reverse,resident", [
    # three hidden slices of 16 (the last one partial), two batch groups (B > 16)
    pytest.param(3, 17, 37, True, True, True, id="T3-B17-H37-packed-reverse"),
    # W_hh streamed from memory every step, K-tiled (three K tiles of 32)
    pytest.param(2, 2, 70, False, False, False, id="T2-B2-H70-streamed"),
])
def test_persistent_matches_sequence(mode, T, B, H, packed, reverse, resident):
    # float64 under the interpreter; on a GPU (no float64 kernels there) float32, one synchronised launch
    dtype = torch.float32 if DEVICE == "cuda" else torch.float64
    _compare_kernels(MODE_ID[mode], T, B, H, packed, reverse, dtype, PersistentConfig(16, 32, 4, resident))


@pytest.mark.parametrize("mode", [LSTM, GRU])
def test_single_launch_counters(mode):
    """``P_h == 1``: one launch over all steps with ``SYNC`` (the interpreter runs the batch
    groups one after another; each program polls the counters its own release increments set)."""
    _compare_kernels(mode, 4, 18, 20, True, False, torch.float32, PersistentConfig(16, 32, 4, True), sync=True)


PERSISTENT_CASES = [
    ("LSTM", Case("pers-packed-bidir-layers2", dict(bidirectional=True, num_layers=2), packed="unsorted", B=4, T=4,
                  H=20)),
    ("GRU", Case("pers-odd-B17-H33-reverse-packed", dict(bidirectional=True), I=3, packed="sorted", B=17, T=3,
                 H=33)),
    ("RNN", Case("pers-relu-no-bias-no-state", dict(nonlinearity="relu", bias=False), with_state=False, H=19, T=4)),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")])
@pytest.mark.parametrize("family,case", [pytest.param(f, c, id=f"{f}-{c.id}") for f, c in PERSISTENT_CASES])
def test_persistent_parity(family, case, dtype):
    """The layers forced onto the persistent kernel against torch.nn: outputs, states, every gradient."""
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("float64 is not supported on CUDA by the triton backend")
    backend = get_backend("triton")
    backend.kernel = "persistent"
    try:
        check_layer(family, case, "triton", dtype, DEVICE)
    finally:
        backend.kernel = "auto"


def test_choose_kernel():
    for dtype in (torch.bfloat16, torch.float32):
        for H in (128, 256, 512, 1024):
            for B in (1, 16, 256):
                # batch 256 at hidden 512/1024 needs slices wider than MAX_AUTO_UNITS (they spilled)
                want = "step" if B == 256 and H >= 512 else "persistent"
                assert choose_kernel("auto", LSTM, H, H, B, dtype) == want, (H, B, dtype)
                cfg = persistent_config(LSTM, H, B, dtype)
                p_h, p_b = cfg.grid(H, B)
                assert p_h * p_b <= MAX_PROGRAMS and (cfg.block_u <= MAX_AUTO_UNITS) == (want == "persistent")
    # a batch too large for one co-resident grid, and projection, take the other kernels
    assert choose_kernel("auto", LSTM, 1024, 1024, 1 << 16, torch.float32) in ("sequence", "step")
    assert choose_kernel("auto", LSTM, 200, 100, 4, torch.float32) == "step"
    assert choose_kernel("step", GRU, 64, 64, 4) == "step"
    with pytest.raises(ValueError, match="no projection"):
        choose_kernel("persistent", LSTM, 64, 32, 4)
    with pytest.raises(ValueError, match="kernel must be"):
        choose_kernel("fast", LSTM, 8, 8, 1)
    # W_hh slices stay resident while they fit the registers (RESIDENT_REGS), else stream from L2
    assert persistent_config(LSTM, 512, 16, torch.bfloat16).w_resident
    assert not persistent_config(LSTM, 1024, 16, torch.bfloat16).w_resident
    assert not persistent_config(LSTM, 128, 16, torch.float32).w_resident  # 3xTF32 (TF32 off here)
