"""Compile check of the CUDA backend without a GPU.

Every ``.cu`` under ``csrc/`` is compiled with nvcc for sm_80 and sm_90 and its
cubin read back with ``cuobjdump``: every kernel template instance is there, has a
real body and spills nothing. The torch binding (``csrc/cuda/*.cpp``, host C++) is
syntax-checked with g++ against the headers of a CUDA build of torch and of the
cuBLAS/cuSPARSE/cuSOLVER wheels, which a CPU-only torch and the CUDA toolkit lack:
pip downloads those wheels once and only their ``include/`` folders are kept, under
``~/.cache/rnnfast/`` (``RNNFAST_CACHE`` overrides), so later runs take seconds;
compiled cubins and passed syntax checks are cached there too, keyed by sources, flags
and compiler.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))
BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
ARCHS = ("80", "90")
# as setup.py compiles them through torch's CUDAExtension (which adds the -D flags and the GPU's -arch)
NVCC_FLAGS = ("-O3", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
# headers of a CUDA build of torch and of the libraries ATen/cuda/CUDAContext.h includes;
# torch 2.14's headers need C++20
HEADER_WHEELS = ("torch==2.14.1", "nvidia-cublas==13.1.1.3", "nvidia-cusparse==12.6.3.3", "nvidia-cusolver==12.0.4.66")
HEADER_PREFIXES = ("torch/include/", "nvidia/cu13/include/")
BINDING_STD = "-std=c++20"
# a kernel below this many SASS instructions (16 bytes each on sm_80/sm_90) is taken for an empty body
MIN_INSTRUCTIONS = 24
# template instances each kernel must have: storage type x mode (rnnfast.backend.MODES)
DTYPES = ("f", "d", "6__half", "13__nv_bfloat16")
MODES = ("0", "1", "2", "3")
KERNEL_NAME = re.compile(r"(\w+?_kernel)I(f|d|6__half|13__nv_bfloat16)Li(\d)EE")

CACHE = Path(os.environ.get("RNNFAST_CACHE") or Path.home() / ".cache" / "rnnfast")
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (the CUDA toolkit is not installed)")


def _cuda_home() -> Path:
    """The toolkit nvcc belongs to, as nvcc reports it (PATH may hold a wrapper script)."""
    r = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                       text=True)
    top = re.search(r"^#\$ TOP=(.+)$", r.stderr + r.stdout, re.M)
    assert top, f"nvcc --dryrun did not say where the toolkit is:\n{r.stderr[-2000:]}"
    return Path(os.path.realpath(top.group(1).strip()))


def _nvcc_version() -> str:
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout


def _cuobjdump() -> str:
    """cuobjdump from the toolkit, else from the nvidia-cuda-cuobjdump wheel (requirements-dev.txt)."""
    found = shutil.which("cuobjdump") or shutil.which("cuobjdump", path=str(_cuda_home() / "bin"))
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for base in getattr(nvidia, "__path__", []):
        for cand in sorted(Path(base).glob("cu*/bin/cuobjdump")):
            return str(cand)
    pytest.fail("cuobjdump not found: install the nvidia-cuda-cuobjdump wheel (make test does)")


def _cxx_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def _key(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:20]


def compile_cubin(cu: Path, arch: str) -> tuple[Path, str]:
    """(cubin, ptxas report) of one .cu for sm_<arch>, from the cache when its inputs are unchanged."""
    headers = sorted(cu.parent.glob("*.h")) + sorted(cu.parent.glob("*.cuh"))
    sources = [cu.read_bytes()] + [h.read_bytes() for h in headers]
    key = _key(*sources, arch, NVCC_FLAGS, _nvcc_version())
    out_dir = CACHE / "cubins"
    cubin, report = out_dir / f"{cu.stem}-sm{arch}-{key}.cubin", out_dir / f"{cu.stem}-sm{arch}-{key}.ptxas"
    if not (cubin.exists() and report.exists()):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = cubin.with_suffix(f".tmp{os.getpid()}")
        r = subprocess.run([NVCC, *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp), str(cu)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"nvcc failed on {cu.name} for sm_{arch}:\n{r.stderr[-4000:]}"
        report.write_text(r.stderr)
        tmp.replace(cubin)
    return cubin, report.read_text()


def header_dir() -> Path:
    """Include folders of a CUDA torch and cuBLAS/cuSPARSE/cuSOLVER, extracted once from their wheels."""
    dest = CACHE / "cuda-headers" / _key(HEADER_WHEELS, HEADER_PREFIXES)
    if (dest / "complete").exists():
        return dest
    with tempfile.TemporaryDirectory(dir=CACHE if CACHE.exists() else None) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                            "-d", tmp, *HEADER_WHEELS], capture_output=True, text=True)
        assert r.returncode == 0, f"pip download of {HEADER_WHEELS} failed:\n{r.stderr[-3000:]}"
        staging = Path(tmp) / "include"
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(staging, [m for m in z.namelist() if m.startswith(HEADER_PREFIXES)])
            wheel.unlink()
        (staging / "complete").write_text("\n".join(HEADER_WHEELS))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        staging.replace(dest)
    return dest


def kernels_of(cubin: Path) -> dict[str, dict]:
    """Per kernel (mangled name): its resource usage fields and its code size in bytes."""
    tool = _cuobjdump()
    usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True)
    kernels: dict[str, dict] = {}
    name = None
    for line in usage.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            kernels[name] = {k: v for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    elf = subprocess.run([tool, "-elf", str(cubin)], capture_output=True, text=True, check=True)
    for line in elf.stdout.splitlines():
        m = re.match(r"\s*[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)\s.*PROGBITS.*\s\.text\.(\S+)$", line)
        if m and m.group(2) in kernels:
            kernels[m.group(2)]["text_bytes"] = int(m.group(1), 16)
    return kernels


@pytest.fixture(scope="module")
def built() -> dict:
    """Every cubin and the extracted headers, produced concurrently (nvcc is single-threaded)."""
    jobs = {(cu, arch): (compile_cubin, cu, arch) for cu in CU_FILES for arch in ARCHS}
    jobs["headers"] = (header_dir,)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {k: pool.submit(*job) for k, job in jobs.items()}
    return {k: f for k, f in futures.items()}


def test_sources_found():
    assert CU_FILES, "no .cu file under csrc/"
    assert BINDINGS, "no torch binding under csrc/cuda/"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_kernels_compile_real_and_spill_free(built, cu, arch):
    cubin, ptxas = built[(cu, arch)].result()
    kernels = kernels_of(cubin)
    assert kernels, f"{cu.name}: no kernel in the sm_{arch} cubin"
    instances: dict[str, set] = {}
    for name, res in kernels.items():
        assert res["STACK"] == "0" and res["LOCAL"] == "0", f"{name} uses local memory (spills): {res}"
        assert res.get("text_bytes", 0) >= 16 * MIN_INSTRUCTIONS, f"{name} has an (almost) empty body: {res}"
        m = KERNEL_NAME.search(name)
        assert m, f"unexpected kernel name {name}"
        instances.setdefault(m.group(1), set()).add((m.group(2), m.group(3)))
    for base, got in instances.items():
        missing = {(d, mo) for d in DTYPES for mo in MODES} - got
        assert not missing, f"{cu.name}: {base} lacks instances (dtype, mode) {sorted(missing)}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    assert len(spills) == len(kernels), f"ptxas reported {len(spills)} functions, cuobjdump {len(kernels)}"
    assert all(s == ("0", "0") for s in spills), f"{cu.name} sm_{arch}: ptxas reports spills: {spills}"


@pytest.mark.parametrize("src", BINDINGS, ids=lambda p: p.name)
def test_binding_compiles_against_cuda_torch_headers(built, src):
    inc = built["headers"].result()
    torch_inc = inc / "torch" / "include"
    cmd = [
        os.environ.get("CXX", "g++"), BINDING_STD, "-fsyntax-only", "-Wall", "-Werror=return-type",
        "-D_GLIBCXX_USE_CXX11_ABI=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_cuda",
        f"-I{torch_inc}", f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{_cuda_home() / 'include'}", f"-I{inc / 'nvidia' / 'cu13' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", str(src),
    ]
    local = [src] + sorted((ROOT / "csrc").rglob("*.h"))
    passed = CACHE / "syntax-ok" / f"{src.stem}-{_key(*(p.read_bytes() for p in local), cmd, _cxx_version(cmd[0]))}"
    if passed.exists():
        return
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{src.name} does not compile against torch 2.14 CUDA headers:\n{r.stderr[-6000:]}"
    assert "warning" not in r.stderr, r.stderr[-4000:]
    passed.parent.mkdir(parents=True, exist_ok=True)
    passed.touch()
