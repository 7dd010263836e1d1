"""examples/charlm.py: a smoke run trains, evaluates, samples and resumes; decoding
returns strings of the requested length from the model's vocabulary."""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnfast

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "charlm.py"
spec = importlib.util.spec_from_file_location("charlm", SCRIPT)
charlm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(charlm)

SMOKE_STEPS = 6


def run(*args: str) -> str:
    """Run the script with ``args`` (one thread, quick); its stdout."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("charlm")
    run("train", "--smoke", "--max-steps", str(SMOKE_STEPS), "--out", str(out))
    return out


def test_smoke_run_writes_metrics(smoke_run):
    m = json.loads((smoke_run / "metrics.json").read_text())
    for key in ("val_loss", "bits_per_char", "train_tokens", "tokens_per_s", "sample_chars_per_s",
                "wall_minutes", "available_backends", "resolved_backend", "layer_class", "config", "curve"):
        assert key in m, key
    cfg = m["config"]
    assert m["steps"] == SMOKE_STEPS
    assert m["train_tokens"] == SMOKE_STEPS * cfg["batch"] * cfg["seq_len"]
    assert 0 < m["val_loss"] < 10 and m["bits_per_char"] == pytest.approx(m["val_loss"] / math.log(2))
    assert m["tokens_per_s"] > 0 and m["sample_chars_per_s"] > 0
    assert m["layer_class"].startswith("rnnfast.modules.")
    assert set(m["resolved_backend"].values()) <= set(m["available_backends"])
    assert m["curve"] and {"tokens", "minutes", "train_loss", "val_loss"} <= m["curve"][-1].keys()
    samples = (smoke_run / "samples.txt").read_text()
    assert "temperature 0.5" in samples and "temperature 1.5" in samples and "beam search" in samples
    assert (smoke_run / "loss.png").stat().st_size > 0


def test_resume_continues_the_run(smoke_run):
    run("train", "--smoke", "--resume", "--max-steps", str(SMOKE_STEPS + 4), "--out", str(smoke_run))
    m = json.loads((smoke_run / "metrics.json").read_text())
    assert m["resumed_from_step"] == SMOKE_STEPS and m["steps"] == SMOKE_STEPS + 4
    assert m["train_tokens"] == (SMOKE_STEPS + 4) * m["config"]["batch"] * m["config"]["seq_len"]
    assert [p["step"] for p in m["curve"]] == [SMOKE_STEPS, SMOKE_STEPS + 4]


def test_sample_command(smoke_run):
    text = run("sample", "--out", str(smoke_run), "--prompt", "A", "--sample-chars", "25",
               "--temperature", "0.8", "--top-k", "5", "--beam", "3")
    assert "temperature 0.8, top-k 5" in text and "beam search, width 3" in text and "chars/s" in text


def test_sample_int8_compares_with_float(smoke_run):
    run("sample", "--out", str(smoke_run), "--quantize", "int8", "--sample-chars", "20", "--temperature", "1.0",
        "--beam", "0")
    report = json.loads((smoke_run / "int8.json").read_text())
    assert report["int8"]["layer_class"].startswith("rnnfast.quantize.Quantized")
    assert report["float32"]["layer_class"].startswith("rnnfast.modules.")
    # int8 weights move the loss a little, not a lot (the smoke model is barely trained)
    assert 0 < report["float32"]["val_loss"] < 10 and abs(report["val_loss_increase"]) < 0.1
    assert report["val_loss_increase"] == pytest.approx(report["int8"]["val_loss"] - report["float32"]["val_loss"])


def tiny_model(torch_layers: bool = False, cell: str = "lstm") -> "charlm.CharLM":
    cfg = argparse.Namespace(cell=cell, embed=8, hidden=16, layers=2, dropout=0.1, backend="auto")
    torch.manual_seed(0)
    return charlm.CharLM(len(VOCAB), cfg, torch_layers)


VOCAB = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak."))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_decoding_length_and_vocabulary(cell):
    model = tiny_model(cell=cell)
    assert isinstance(model.rnn, (rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN))
    for text in (charlm.sample(model, VOCAB, "Fir", 37, temperature=0.7, top_k=3, seed=1),
                 charlm.sample(model, VOCAB, "F", 37, temperature=1.5),
                 charlm.beam_search(model, VOCAB, "Fir", 37, width=4)):
        assert isinstance(text, str) and len(text) == 37 and set(text) <= set(VOCAB)
    # top-1 sampling and a one-beam search are both greedy decoding
    assert charlm.sample(model, VOCAB, "Fir", 20, top_k=1) == charlm.beam_search(model, VOCAB, "Fir", 20, width=1)
    with pytest.raises(ValueError, match="vocabulary"):
        charlm.sample(model, VOCAB, "Z", 5)


def test_torch_layers_is_the_same_model():
    ours, theirs = tiny_model(), tiny_model(torch_layers=True)
    assert charlm.layer_class(ours) == "rnnfast.modules.LSTM"
    assert charlm.layer_class(theirs) == "torch.nn.modules.rnn.LSTM"
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randint(len(VOCAB), (3, 11))
    torch.testing.assert_close(ours.eval()(x)[0], theirs.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_streams_are_contiguous_rows():
    data = torch.arange(103)
    x, y = charlm.streams(data, rows=4, offset=2)
    assert x.shape == y.shape == (4, 25)
    assert torch.equal(y, x + 1) and torch.equal(x[1, :3], torch.tensor([27, 28, 29]))
