"""The ETTh1 forecasting example: protocol (splits, statistics, window counts) and a smoke run of the table."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rnnfast

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("forecast_example", ROOT / "examples" / "forecast.py")
fc = importlib.util.module_from_spec(spec)
sys.modules["forecast_example"] = fc
spec.loader.exec_module(fc)

pytestmark = pytest.mark.skipif(not fc.DATA.exists(), reason="data/ETTh1.csv missing")


def test_split_boundaries_follow_the_standard_protocol():
    assert fc.split_bounds(96) == {"train": (0, 8640), "val": (8544, 11520), "test": (11424, 14400)}
    assert fc.split_bounds(336)["test"] == (11520 - 336, 14400)


def test_normalisation_uses_training_rows_only():
    raw = fc.load_etth1(fc.DATA, "multivariate")
    assert raw.shape == (17420, 7)
    s = fc.make_splits(raw, 96)
    np.testing.assert_allclose(s.mean, raw[:8640].mean(0))
    np.testing.assert_allclose(s.std, raw[:8640].std(0))
    # the test segment is rows 11424..14400 scaled by the training statistics, not its own
    np.testing.assert_allclose(s.test.numpy(), ((raw[11424:14400] - s.mean) / s.std).astype(np.float32), rtol=1e-6)
    assert abs(s.train.mean().item()) < 1e-4 and abs(s.test.mean(0)).max().item() > 0.05
    uni = fc.load_etth1(fc.DATA, "univariate")
    np.testing.assert_array_equal(uni[:, 0], raw[:, 6])  # OT only


@pytest.mark.parametrize("horizon, counts", [(96, (8449, 2785, 2785)), (720, (7825, 2161, 2161))])
def test_window_counts_match_the_standard(horizon, counts):
    s = fc.make_splits(fc.load_etth1(fc.DATA, "multivariate"), 96)
    assert tuple(fc.n_windows(seg, 96, horizon) for seg in (s.train, s.val, s.test)) == counts
    x, y = fc.windows(s.test, torch.tensor([0, counts[2] - 1]), 96, horizon)
    assert x.shape == (2, 96, 7) and y.shape == (2, horizon, 7)
    torch.testing.assert_close(y[1, -1], s.test[-1])  # the last test window ends on row 14399


def test_every_recurrent_core_is_rnnfast():
    for name in ("segrnn", "gru-direct", "gru-seq2value", "gru-encdec"):
        model = fc.build_model(name, 96, 96, 7, 16, "reference")
        cores = [m for m in model.modules() if isinstance(m, (torch.nn.RNNBase, torch.nn.RNNCellBase))]
        assert cores and all(isinstance(m, rnnfast.modules._BackendChoice) for m in cores)
        assert model(torch.randn(2, 96, 7)).shape == (2, 96, 7)


def test_smoke_table(tmp_path):
    records = fc.main(["--all", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == records
    keys = {(r["task"], r["mode"], r["model"]) for r in records}
    for task in ("univariate", "multivariate"):
        for mode, model in [("direct", "segrnn"), ("direct", "gru-direct"), ("seq2value", "gru-seq2value"),
                            ("encoder-decoder", "gru-encdec"), ("direct", "linear"), ("direct", "last-value")]:
            assert (task, mode, model) in keys
    for r in records:
        assert {"task", "mode", "model", "lookback", "horizon", "mse", "mae", "train_minutes", "layers",
                "backend"} <= r.keys()
        assert r["lookback"] == 96 and r["horizon"] == 96 and r["test_windows"] == 2785
        assert np.isfinite(r["mse"]) and np.isfinite(r["mae"])
        assert r["backend"] in rnnfast.registered_backends()
        if r["model"] in ("linear", "last-value"):
            assert r["layers"] == []
        else:
            assert r["layers"] and all(layer.startswith("rnnfast.modules.") for layer in r["layers"])
    assert any("rnnfast.modules.GRUCell" in r["layers"] for r in records)
    for r in records:  # gradient clipping for the GRUs run over time, the one-step score beside the rollout
        assert r.get("clip") == (None if r["model"] in ("segrnn", "linear", "last-value") else 1.0), r["model"]
        assert ("next_value_mse" in r) == (r["model"] == "gru-seq2value")
    assert (tmp_path / "forecast.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert "| multivariate | 96 | segrnn (smoke) |" in table and "0.368" in table
    assert "univariate gru-seq2value (smoke), L=96: the next value (one step) has test MSE" in table
    # a second run merges: one record per (task, mode, model, lookback, horizon)
    again = fc.main(["--smoke", "--threads", "1", "--task", "univariate", "--model", "linear", "--out", str(tmp_path)])
    assert len(again) == len(records)


def test_outputs_default_to_runs_and_smoke_stays_out_of_committed_results():
    assert fc.parse_args([]).out == Path("runs/forecast")
    with pytest.raises(SystemExit):
        fc.parse_args(["--all", "--smoke", "--out", str(fc.COMMITTED / "forecast")])


def test_smoke_records_never_replace_full_ones(tmp_path):
    full = {"task": "multivariate", "mode": "direct", "model": "segrnn", "lookback": 96, "horizon": 96,
            "mse": 0.365, "smoke": False}
    path = tmp_path / "metrics.json"
    fc.merge_records(path, [full])
    merged = fc.merge_records(path, [dict(full, mse=9.0, smoke=True)])
    assert sorted((r["mse"], r["smoke"]) for r in merged) == [(0.365, False), (9.0, True)]
    again = fc.merge_records(path, [dict(full, mse=0.36)])  # a full run replaces the full record only
    assert sorted((r["mse"], r["smoke"]) for r in again) == [(0.36, False), (9.0, True)]
