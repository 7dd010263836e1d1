"""Test configuration: TF32 off, Triton under its interpreter where no GPU is
present, and the ``backend`` fixture that runs every parity test on every
backend usable here."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before triton is first imported: the Triton kernels then run on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rnnfast  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Backends that run through an interpreter on this machine: only `quick` cases.
INTERPRETED = {"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_device(name: str) -> str:
    """The device a backend's parity tests run on here."""
    return "cpu" if name in ("reference", "cpu") else DEVICE


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = rnnfast.available_backends()
        metafunc.parametrize("backend", names, ids=names)


@pytest.fixture(autouse=True)
def _skip_slow_on_interpreter(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend in INTERPRETED and request.node.get_closest_marker("slow"):
        pytest.skip(f"slow case: not run on {backend} under the Triton interpreter (runs on GPU)")
