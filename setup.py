"""Build rnnfast: the Python package, the Triton kernels (as ``rnnfast.kernels``)
and the C++ extension ``rnnfast._C`` from ``csrc/`` with ninja.

Environment switches: ``RNNFAST_NO_EXT=1`` skips the extension (the package then
runs on its ``reference`` backend); ``RNNFAST_CUDA=1`` forces, ``0`` skips, the
CUDA extension ``rnnfast._cuda`` from ``csrc/cuda/`` (default: built when torch
has CUDA and nvcc is found); ``RNNFAST_EXTRA_CFLAGS`` adds compiler and linker
flags to the CPU extension (``make sanitize`` passes the sanitizers' there).
"""

import glob
import os

import torch

from setuptools import setup
from torch.utils import cpp_extension


def extensions() -> list:
    if os.environ.get("RNNFAST_NO_EXT") == "1":
        return []
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return []
    # -fno-trapping-math lets GCC vectorise the branch-free gate math; vector
    # widths are chosen at run time in csrc/cpu/kernels.cpp, not with -march
    extra = os.environ.get("RNNFAST_EXTRA_CFLAGS", "").split()
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-Wno-psabi", *extra]
    exts = [
        cpp_extension.CppExtension(
            "rnnfast._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp", *extra],
        )
    ]
    if build_cuda():
        exts.append(cuda_extension())
    return exts


def build_cuda() -> bool:
    """``RNNFAST_CUDA=1`` forces the CUDA extension (an error when it cannot be built),
    ``0`` skips it; by default it is built when torch has CUDA and nvcc is found."""
    switch = os.environ.get("RNNFAST_CUDA", "")
    if switch == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a build without CUDA")
    if cpp_extension.CUDA_HOME is None:
        missing.append("torch.utils.cpp_extension finds no CUDA toolkit (set CUDA_HOME)")
    if switch == "1" and missing:
        raise RuntimeError("RNNFAST_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(missing))
    return not missing


def cuda_extension():
    """``rnnfast._cuda``: the gate kernels (``csrc/cuda/*.cu``, no torch headers) and
    their torch binding (``csrc/cuda/layer.cpp``); needs ``rnnfast._C``'s operator schemas."""
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    return cpp_extension.CUDAExtension(
        "rnnfast._cuda",
        sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
        extra_compile_args={"cxx": ["-O3", std], "nvcc": ["-O3", "-std=c++17"]},
    )


setup(
    packages=["rnnfast", "rnnfast.kernels"],
    package_dir={"rnnfast": "rnnfast", "rnnfast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
