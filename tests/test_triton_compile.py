"""Compile gate (CI subset): persistent-kernel variants compiled for sm_90 without a GPU
have no stack (spills), fit the shared memory and keep a resident ``W_hh`` load out of the
time loop. The whole grid: ``make compile-gate`` (see ``tests/triton_compile_gate.py``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
gate = pytest.importorskip("triton_compile_gate", reason="the compile gate needs triton's NVIDIA backend")
if not gate.CUOBJDUMP.exists():
    pytest.skip(f"no cuobjdump in the triton wheel ({gate.CUOBJDUMP})", allow_module_level=True)


def test_compile_gate():
    """The CI subset, in a process without the interpreter (``TRITON_INTERPRET`` makes every
    ``triton.jit`` function an interpreted one, which cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_gate.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


def test_w_load_detection():
    """The TTGIR check tells a load of W_hh before the time loop from one inside it."""
    ttgir = """
    %p = tt.splat %w_hh : !tt.ptr<bf16> -> tensor<16x!tt.ptr<bf16>>
    %q = tt.addptr %p, %o : tensor<16x!tt.ptr<bf16>>, tensor<16xi32>
    %w = tt.load %q : tensor<16x!tt.ptr<bf16>>
    %r = scf.for %k = %a to %b step %c iter_args(%x = %w) -> (tensor<16xbf16>) : i32 {
      %h = tt.load %hp : tensor<16x!tt.ptr<bf16>>
      %w2 = tt.load %q : tensor<16x!tt.ptr<bf16>>
      %y = tt.dot %w2, %x : tensor<16xbf16>
      scf.yield %y : tensor<16xbf16>
    }
    %after = tt.load %q : tensor<16x!tt.ptr<bf16>>
    """
    assert gate.w_loads_in_loop(ttgir) == (1, 1)
