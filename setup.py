"""Build rnnfast: the Python package, the Triton kernels (as ``rnnfast.kernels``)
and the C++ extension ``rnnfast._C`` from ``csrc/`` with ninja.

Environment switches: ``RNNFAST_NO_EXT=1`` skips the extension (the package then
runs on its ``reference`` backend); ``RNNFAST_CUDA=1`` forces, ``0`` skips, the
CUDA sources (default: built when torch has CUDA); ``RNNFAST_EXTRA_CFLAGS`` adds
compiler and linker flags to the extension (``make sanitize`` passes the
sanitizers' there).
"""

import glob
import os

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
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", *extra]
    return [
        cpp_extension.CppExtension(
            "rnnfast._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp", *extra],
        )
    ]


setup(
    packages=["rnnfast", "rnnfast.kernels"],
    package_dir={"rnnfast": "rnnfast", "rnnfast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
