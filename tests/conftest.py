"""Test configuration: TF32 off, Triton under its interpreter where no GPU is
present, poisoned allocations, and the ``backend`` fixture that runs every parity
test on every backend usable here.

Poisoning: during the tests ``torch.empty``, ``empty_like``, ``empty_strided`` and
``Tensor.new_empty`` return tensors filled with NaN (integers: -1, unsigned: their
maximum), and ``RNNFAST_POISON=1`` makes the C++ extension do the same to every CPU
allocation (``at::empty``, which Python cannot reach) and to the buffers it recycles.
An output a kernel leaves partly unwritten then fails parity instead of passing
on memory that happened to hold zeros. ``RNNFAST_POISON=0`` turns both off.
"""

import functools
import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

if not torch.cuda.is_available():
    # must be set before triton is first imported: the Triton kernels then run on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
# read by the extension once, when rnnfast imports it below; subprocesses inherit it
POISON = os.environ.setdefault("RNNFAST_POISON", "1") == "1"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with the 0xFF pattern's values: NaN for floats, -1 (unsigned: the maximum) for integers."""
    with torch.no_grad():  # also fine on a leaf that requires grad
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            t.fill_(-1 if t.dtype.is_signed else torch.iinfo(t.dtype).max)
    return t


def _poisoned(make):
    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        t = make(*args, **kwargs)
        # not while torch.compile traces (fake tensors): a fill there becomes part of the compiled graph
        if torch.compiler.is_compiling() or isinstance(t, FakeTensor):
            return t
        return poison(t)

    return wrapper


if POISON:
    torch.empty = _poisoned(torch.empty)
    torch.empty_like = _poisoned(torch.empty_like)
    torch.empty_strided = _poisoned(torch.empty_strided)
    torch.Tensor.new_empty = _poisoned(torch.Tensor.new_empty)

import pytest  # noqa: E402

import rnnfast  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Backends that run through an interpreter on this machine: only `quick` cases.
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# torch.nn's CPU LSTM under bfloat16 autocast runs on oneDNN, which has no bfloat16 LSTM on CPUs
# without AVX-512 (an AVX2 EPYC): there torch.nn raises this, where rnnfast runs.
ONEDNN_NO_BF16_LSTM = "could not create a primitive descriptor for the LSTM forward propagation primitive"


@functools.cache
def torch_autocast_lstm_fails() -> bool:
    """Whether torch.nn's LSTM raises oneDNN's error under CPU bfloat16 autocast on this machine."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 2)(torch.zeros(1, 1, 2))
    except RuntimeError as err:
        if ONEDNN_NO_BF16_LSTM in str(err):
            return True
        raise
    return False


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Every call to an ``rnnfast::`` operator under it, with its arguments and real outputs
    (including the calls the C++ eager autograd entry makes through the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "rnnfast":
            self.calls.append((func, args, kwargs or {}, out))
        return out


def backend_device(name: str) -> str:
    """The device a backend's parity tests run on here."""
    return "cpu" if name in ("reference", "cpu") else DEVICE


def pytest_generate_tests(metafunc):
    """``backend``: every backend usable here, or those listed in RNNFAST_TEST_BACKENDS (comma-separated)."""
    if "backend" in metafunc.fixturenames:
        names = rnnfast.available_backends()
        chosen = os.environ.get("RNNFAST_TEST_BACKENDS")
        if chosen:
            names = [n for n in names if n in chosen.split(",")]
        metafunc.parametrize("backend", names, ids=names)


@pytest.fixture(autouse=True)
def _skip_slow_on_interpreter(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend in INTERPRETED and request.node.get_closest_marker("slow"):
        pytest.skip(f"slow case: not run on {backend} under the Triton interpreter (runs on GPU)")
