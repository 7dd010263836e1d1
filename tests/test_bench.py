"""Smoke test of ``python -m bench``: the tiny grid through every CPU provider, then the JSON, the
report, the plots and ``--base`` against the committed 2026-11 results (both older schemas)."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import rnnfast
from bench.cases import Case
from conftest import ONEDNN_NO_BF16_LSTM, torch_autocast_lstm_fails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_CPU = os.path.join(ROOT, "bench", "results", "2026-11-26-cpu-cpu.json")
OLD_GPU = os.path.join(ROOT, "bench", "results", "2026-11-26-nvidia-h200.json")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "--grid", "tiny", "--repeats", "3", "--min-seconds", "0.002",
           "--out", str(out), "--base", OLD_CPU]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (stem,) = {p[: -len(".json")] for p in os.listdir(out) if p.endswith(".json")}
    with open(out / (stem + ".json")) as f:
        data = json.load(f)
    return out, stem, data, proc.stdout


def test_every_cpu_provider_appears_timed_or_with_a_reason(tiny_run):
    _, _, data, _ = tiny_run
    assert data["schema"] == "rnnfast-bench/2"
    providers = data["providers"]
    for name in ("torch", "torch-autocast", "torch-int8", "onnxruntime", "rnnfast-reference", "rnnfast-cpu",
                 "rnnfast-autocast", "rnnfast-int8"):
        assert name in providers
        if providers[name]["status"] != "available":
            assert providers[name]["reason"], name
    rows = data["results"]
    timed = {(r["provider"], r["mode"], r["dtype"]) for r in rows if r["status"] == "ok"}
    want = {("torch", "fwd", "float32"), ("torch", "fwdbwd", "float32"), ("torch", "decode", "float32"),
            ("torch", "fwd", "bfloat16"), ("torch-autocast", "fwd", "bfloat16")}
    if torch_autocast_lstm_fails():  # recorded as torch's own error, not timed
        want.remove(("torch-autocast", "fwd", "bfloat16"))
        assert any(r["provider"] == "torch-autocast" and r["status"] == "error" and ONEDNN_NO_BF16_LSTM in r["reason"]
                   for r in rows)
    assert want <= timed
    for r in rows:
        assert r["status"] in ("ok", "unsupported", "error", "skipped")
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["tokens_per_s"] == pytest.approx(r["T"] * r["B"] / (r["p50_ms"] / 1e3))
        case = Case(*(r[k] for k in ("family", "mode", "T", "B", "I", "H", "layers", "dtype")))
        assert r["gflop_per_s"] == pytest.approx(case.flops / (r["p50_ms"] / 1e3) / 1e9)
        if r["provider"] != "onnxruntime":
            assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
        # float32 providers on torch's weights match torch.nn; bfloat16 and int8 within their precision
        if r["max_abs_err"] is not None:
            assert r["max_abs_err"] < (1e-4 if r["dtype"] == "float32" and "int8" not in r["provider"] else 0.1), r
    # every provider timed beside torch.nn carries its speed-up paired per round, shown in the report
    torch_ok = {(r["label"], r["dtype"]) for r in rows if r["provider"] == "torch" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["provider"] != "torch" and (r["label"], r["dtype"]) in torch_ok:
            assert 0 < r["speedup_p20"] <= r["speedup"] <= r["speedup_p80"] and r["paired_rounds"] >= 3, r
    # the int8 providers really quantize (their output differs from float32)
    assert all(r["max_abs_err"] > 0 for r in rows if "int8" in r["provider"] and r["status"] == "ok")
    # a training step allocates what backward needs: more than nothing
    assert any(r["peak_mem_bytes"] > 0 for r in rows if r["status"] == "ok" and r["mode"] == "fwdbwd")


def test_report_plots_and_base(tiny_run):
    out, stem, data, stdout = tiny_run
    report = (out / (stem + ".md")).read_text()
    assert "## float32, forward + backward" in report and "## bfloat16, forward" in report
    for name, p in data["providers"].items():
        assert name in report
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == [], "the tiny grid has no sweep of 3 sizes: no plot expected"
    assert "Change against an earlier run" in report and "2026-11 cpu" in stdout


def test_paired_speedup_divides_out_the_machines_drift():
    from bench.measure import paired_speedup

    drift = np.array([1.0] * 4 + [1.5] * 5)  # the host slows down 1.5x after four rounds
    torch_s, fast_s = list(0.010 * drift), list(0.008 * drift[:7])  # fewer rounds for one: paired on 7
    got = paired_speedup(torch_s, fast_s)
    assert got["speedup_p20"] == pytest.approx(1.25) and got["speedup_p80"] == pytest.approx(1.25)
    assert got["speedup"] == pytest.approx(1.25) and got["paired_rounds"] == 7
    assert np.median(torch_s) / np.median(fast_s) == pytest.approx(1.875)  # the two medians alone: off


def test_old_results_files_load():
    from bench import report

    cpu = report.load(OLD_CPU)
    labels = {(r["label"], r["provider"]) for r in cpu["results"]}
    assert ("LSTM fwd T100 B64 I256 H256", "rnnfast-cpu") in labels
    gpu = report.load(OLD_GPU)
    assert {r["provider"] for r in gpu["results"]} >= {"torch", "rnnfast-triton"}
    assert all(r["p50_ms"] > 0 for r in gpu["results"])


def test_plot_draws_sweeps(tmp_path):
    from bench import report

    env = {"device_name": "cpu", "device": "cpu", "threads": 2, "torch": "x", "rnnfast": "y", "git_commit": "z",
           "date": "d"}
    rows = [{"provider": p, "dtype": "float32", "mode": "fwd", "family": "LSTM", "T": 10, "B": b, "I": h, "H": h,
             "layers": 1, "status": "ok", "tokens_per_s": 1000.0 * b / h}
            for p in ("torch", "rnnfast-cpu") for b, h in ((1, 32), (8, 32), (32, 32), (8, 16), (8, 64))]
    paths = report.plot(env, rows, str(tmp_path / "r"))
    assert paths == [str(tmp_path / "r-fwd-float32.png")] and os.path.getsize(paths[0]) > 10_000


def test_gpu_grid_orders_targets_first():
    from bench.cases import gpu_grid

    grid = gpu_grid()
    first_outside = next(i for i, c in enumerate(grid) if not (c.B <= 16 and c.H <= 512))
    assert all(not (c.B <= 16 and c.H <= 512) for c in grid[first_outside:])
    assert {c.mode for c in grid} == {"fwd", "fwdbwd", "decode"} and {c.dtype for c in grid} == {"float32",
                                                                                                "bfloat16"}


def test_budget_and_slow_setup_skips_are_recorded():
    from bench.cases import tiny_grid
    from bench.measure import run_grid
    from bench.providers import TorchNN

    grid = tiny_grid()[:2]
    rows = run_grid(grid, [TorchNN()], "cpu", 3, 0.001, max_setup_s=0.0, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "setup took" in rows[1]["reason"]
    rows = run_grid(grid, [TorchNN()], "cpu", 3, 0.001, budget_s=0.0, log=lambda s: None)
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in rows) and len(rows) == 2


def test_gemm_roof_is_measured_and_reported(tiny_run):
    out, stem, data, _ = tiny_run
    roofs = data["environment"]["roof_gflop_per_s"]
    assert set(roofs) == {"float32", "bfloat16"} and all(v > 1 for v in roofs.values())
    md = open(out / (stem + ".md")).read()
    assert md.count("| roof / torch |") == 3  # float32 fwd and fwdbwd, bfloat16 fwd; not decode
    assert f"share of the roof: {roofs['float32']:.0f} GFLOP/s" in md
    for dtype, how in data["environment"]["roof_method"].items():  # the higher of the two, named
        assert "torch.matmul" in how and (how.startswith("one ") or rnnfast._C.product_isa(dtype) in how), how


def test_flops_count_the_gemms_of_every_layer():
    lstm = Case("LSTM", "fwd", 10, 4, 32, 64, 2)
    assert lstm.flops == 10 * 4 * 2 * 4 * 64 * ((32 + 64) + 2 * 64)
    assert Case("GRU", "fwdbwd", 10, 4, 32, 64).flops == 3 * 10 * 4 * 2 * 3 * 64 * (32 + 64)
    assert Case("RNN", "decode", 1, 1, 8, 8).flops == 2 * 8 * 16


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="the cpu extension is not built")
def test_peak_gflops():
    from rnnfast import _C

    for dtype, needs in (("float32", _C.has_fused_loop()), ("bfloat16", _C.has_bf16_loop())):
        peak = _C.peak_gflops(dtype, 0.02)
        assert peak > 1 if needs else peak == 0
        assert bool(_C.product_isa(dtype)) == needs
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        _C.peak_gflops("float16")


def test_a_later_run_on_the_same_day_does_not_overwrite(tmp_path):
    from bench import report

    env = {"device": "cpu", "device_name": "x"}
    first = report.results_stem(str(tmp_path), env, "cpu")
    open(first + ".md", "w").close()
    second = report.results_stem(str(tmp_path), env, "cpu")
    assert second == first + "-2"
    open(second + ".json", "w").close()
    assert report.results_stem(str(tmp_path), env, "cpu") == first + "-3"


def test_sweep_times_random_configurations_and_reruns_them(tmp_path):
    """``python -m bench.sweep``: random configurations timed against torch.nn, the report slowest
    first, and ``--rerun`` of an earlier sweep's configurations."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    quick = ["--rounds", "2", "--min-seconds", "0.001", "--out", str(tmp_path)]
    first = subprocess.run([sys.executable, "-m", "bench.sweep", "--count", "3", "--max-cost", "1e6", "--seed", "5",
                            *quick], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (path,) = tmp_path.glob("*-cpu-sweep.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "rnnfast-sweep/1" and len(data["results"]) == 3
    for r in data["results"]:
        assert r["torch_ms"] > 0 and 0 < r["speedup_p20"] <= r["speedup"] <= r["speedup_p80"], r
    table = [line for line in path.with_suffix(".md").read_text().splitlines() if line.startswith("| ") and "x |" in line]
    speedups = [float(line.split("|")[3].strip().rstrip("x")) for line in table]
    assert len(speedups) == 3 and speedups == sorted(speedups)
    again = subprocess.run([sys.executable, "-m", "bench.sweep", "--rerun", str(path), "--below", "1e9", *quick],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rerun = json.loads((tmp_path / (path.stem + "-2.json")).read_text())["results"]
    assert [r["label"] for r in rerun] == [r["label"] for r in data["results"]]


def test_sweep_pairs_each_round(monkeypatch):
    """bench.sweep's speed-up divides each round's torch.nn time by rnnfast's in the same round: a host whose
    speed changes from round to round (here 1x to 5x) gives the exact 2.0x, not ratios of times out of order."""
    import bench.sweep as sweep

    slow = iter([1.0, 2.0, 1.0, 6.0, 3.0, 10.0, 5.0, 4.0, 2.0, 8.0, 4.0])  # calibration, then (torch, rnnfast) pairs
    monkeypatch.setattr(sweep, "steps", lambda cfg, backend: (lambda: None, lambda: None))
    monkeypatch.setattr(sweep, "time_batch", lambda step, calls, device: next(slow))
    got = sweep.measure(sweep.Config("GRU", "fwd", 2, 1, 3, 4), "cpu", rounds=5, min_seconds=1.0)
    assert got["speedup"] == got["speedup_p20"] == got["speedup_p80"] == 2.0
    assert got["torch_ms"] == 6000.0


@pytest.mark.parametrize("cfg", [
    dict(family="LSTM", mode="fwd", T=2, B=3, I=4, H=6, layers=2, bidirectional=True, options={"proj_size": 3}),
    dict(family="GRU", mode="fwdbwd", T=3, B=2, I=4, H=5, packed=True),
    dict(family="LSTMCell", mode="fwd", T=3, B=2, I=4, H=5),
    dict(family="RNNCell", mode="fwdbwd", T=3, B=2, I=4, H=5, options={"nonlinearity": "relu"}),
], ids=["lstm-proj-bidir", "gru-packed-train", "lstm-cell", "relu-cell-train"])
def test_sweep_gives_states_to_both_modules(cfg):
    """A drawn configuration with ``states`` hands torch.nn and rnnfast the same initial states, of
    the shapes each layout (or cell, stepped T times) takes; seeds keep the shapes they drew before
    states and cells were drawn too."""
    import bench.sweep as sweep

    config = sweep.Config(**cfg, states=True)
    assert "hx" in config.label.split()
    ref, fast = sweep.steps(config, "reference")
    a, b = ref(), fast()
    if config.mode == "fwd":
        torch.testing.assert_close(b, a)
    with open(os.path.join(ROOT, "bench", "results", "2026-12-07-cpu-sweep-10.json")) as f:
        committed = json.load(f)["results"]
    drawn = sweep.drawn(9, 6, ["fwd", "fwdbwd"], 3e10)
    shape = ("mode", "T", "B", "I", "H")
    assert [(c.family.removesuffix("Cell"), *(getattr(c, k) for k in shape)) for c in drawn] == [
        (r["family"], *(r[k] for k in shape)) for r in committed[:6]]


@pytest.mark.parametrize("precision, flag, dtype", [("bfloat16", "bf16", torch.bfloat16),
                                                   ("autocast", "autocast", torch.bfloat16),
                                                   ("float16", "fp16", torch.float16),
                                                   ("float64", "f64", torch.float64)])
def test_sweep_draws_other_precisions(precision, flag, dtype):
    """``--precision``: a seed draws the shapes it draws in float32, labelled with the precision; torch.nn
    and rnnfast run the configuration in it (cast modules and inputs, or float32 modules under bfloat16
    autocast), returning the same dtypes and outputs within bfloat16's error."""
    import bench.sweep as sweep

    plain, low = sweep.drawn(2, 5, ["fwd", "fwdbwd"], 1e8), sweep.drawn(2, 5, ["fwd", "fwdbwd"], 1e8, precision)
    assert [c.label + f" {flag}" for c in plain] == [c.label for c in low]
    assert all(c.dtype == str(dtype).removeprefix("torch.") and c.autocast == (precision == "autocast") for c in low)
    # (RNN: autocast casts it whole on CPU, as it does padded LSTMs, whose oneDNN kernel some CPUs lack in bfloat16)
    config = replace(low[0], family="RNN", mode="fwd", T=3, B=2, I=4, H=5, layers=1, packed=False, options={})
    ref, fast = sweep.steps(config, "cpu")
    (a, _), (b, _) = ref(), fast()
    assert a.dtype == b.dtype == dtype
    torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2)
