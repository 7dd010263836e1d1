"""GPU peers for the bench (FlashRNN, Haste): fetch their packages here, install them on the GPU machine.

The GPU machine has no network, so ``python -m bench.peers download`` (``make bench-peers``) saves the
packages into ``bench/peers/`` (untracked and not git-ignored, so it travels with the working tree to
the device machine). There ``python -m bench.peers install`` (run by ``bench/gpu_check.sh``) installs
each from that folder only and records in ``bench/peers/status.json`` whether it installed and, if
not, why; the bench's providers report that reason.

Known here (CPU torch 2.13): ``haste-pytorch-cpu`` 0.5.5 fails to build, as its sources include CUDA
headers; ``haste-pytorch`` 0.5.0rc0 needs nvcc, the CUDA headers (cuBLAS included) and a CUDA torch,
and its Makefile's GPU architectures are patched at install (see :func:`_haste_env`); ``flashrnn``
compiles its CUDA kernels on first use (needs nvcc and ninja).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

FOLDER = os.path.join(os.path.dirname(__file__), "peers")
STATUS = os.path.join(FOLDER, "status.json")
# pip requirement -> importable module; the pure-python dependencies flashrnn needs beyond torch/triton
PEERS = {"flashrnn==1.0.8": "flashrnn", "haste-pytorch==0.5.0rc0": "haste_pytorch"}
DEPS = ["einops", "ninja"]


def download() -> None:
    """Save the peers (source distributions or wheels, no dependencies) and their small deps here."""
    os.makedirs(FOLDER, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", FOLDER, *PEERS, *DEPS]
    subprocess.run(cmd, check=True)
    print(f"saved into {FOLDER}: {sorted(f for f in os.listdir(FOLDER) if f != 'status.json')}")


def _haste_env() -> dict:
    """Haste's Makefile builds for compute_37/60/70, which nvcc 12+ rejects ("Unsupported gpu
    architecture 'compute_37'"), with -std=c++11: override both (make reads MAKEFLAGS' variable
    assignments as command-line ones) for this GPU's architecture."""
    import torch

    if not torch.cuda.is_available():
        return {}
    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    return {"MAKEFLAGS": f"GPU_ARCH_FLAGS={arch} NVCC_FLAGS=-std=c++17\\ -x\\ cu\\ -Xcompiler\\ -fPIC"}


def _pip_install(spec: str, timeout_s: float, env: Optional[dict] = None) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", FOLDER,
           "--no-build-isolation", "--no-deps", spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, f"pip install {spec} took over {timeout_s:.0f}s"
    if proc.returncode == 0:
        return True, ""
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()]
    # the compiler's or nvcc's first complaint says more than pip's closing lines
    first = [ln for ln in lines if "fatal" in ln or "error:" in ln and "subprocess-exited" not in ln][:2]
    last = [ln for ln in lines if ln.startswith("ERROR")][-1:]
    return False, f"pip install {spec}: " + " | ".join(dict.fromkeys(first + last))[:500]


def install(timeout_s: float) -> dict:
    """Install each peer from the folder; returns and records ``{module: {ok, reason}}``."""
    status = {}
    if not os.path.isdir(FOLDER):
        reason = f"{FOLDER} is missing: run `make bench-peers` on a machine with network first"
        status = {mod: {"ok": False, "reason": reason} for mod in PEERS.values()}
    else:
        for dep in DEPS:
            _pip_install(dep, timeout_s)  # already present on most machines; a failure shows at import
        for spec, mod in PEERS.items():
            ok, reason = _pip_install(spec, timeout_s, _haste_env() if mod == "haste_pytorch" else None)
            if ok:
                probe = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
                if probe.returncode != 0:
                    ok, reason = False, "installed, import fails: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
            status[mod] = {"ok": ok, "reason": reason}
            print(f"{mod}: {'installed' if ok else reason}", flush=True)
        with open(STATUS, "w") as f:
            json.dump(status, f, indent=1)
    return status


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("download", "install"))
    p.add_argument("--timeout-s", type=float, default=240.0, help="per package, for install")
    args = p.parse_args()
    download() if args.action == "download" else install(args.timeout_s)


if __name__ == "__main__":
    main()
