"""The tour's library pieces (examples/tour/): beam search, attention masking over padding,
the packing round trip, initialisation and the data builders; and a seconds-long run of
examples/recurrent_neural_networks.py end to end."""

import datetime as dt
import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

import rnnfast

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from tour import data, nets  # noqa: E402


# ---------------------------------------------------------------- beam search

def markov_step(table: torch.Tensor):
    """A step function whose next-token log-probabilities depend on the last token only."""
    def step(tokens, state):
        return table[state[0], tokens], state
    return step


def sequence_logp(table: torch.Tensor, row: int, seq: list[int], bos: int, eos: int) -> float:
    """Log-probability of ``seq`` under ``markov_step``; steps after the first eos cost nothing."""
    total, prev = 0.0, bos
    for tok in seq:
        total += float(table[row, prev, tok])
        if tok == eos:
            break
        prev = tok
    return total


@pytest.mark.parametrize("width", [1, 3])
def test_beam_search_matches_greedy_and_scores(width):
    torch.manual_seed(0)
    B, V, bos, eos, L = 4, 6, 0, 1, 5
    table = torch.randn(B, V, V).log_softmax(-1)
    rows = torch.arange(B)
    seqs, scores = nets.beam_search(markov_step(table), (rows,), bos, eos, width, L)
    assert seqs.shape[0] == B and seqs.shape[1] <= L
    for b in range(B):
        s = seqs[b].tolist()
        assert scores[b].item() == pytest.approx(sequence_logp(table, b, s, bos, eos), abs=1e-5)
        if eos in s:  # after eos: eos padding only
            assert set(s[s.index(eos):]) == {eos}
    if width == 1:  # the argmax chain
        for b in range(B):
            prev, expect = bos, []
            for _ in range(seqs.shape[1]):
                prev = int(table[b, prev].argmax())
                expect.append(prev)
                if prev == eos:
                    break
            assert seqs[b, :len(expect)].tolist() == expect


def test_wide_beam_finds_the_exhaustive_best():
    torch.manual_seed(1)
    B, V, bos, eos, L = 3, 4, 0, 1, 4
    table = torch.randn(B, V, V).mul(2).log_softmax(-1)
    seqs, scores = nets.beam_search(markov_step(table), (torch.arange(B),), bos, eos, V ** L, L)
    for b in range(B):
        best = max(sequence_logp(table, b, list(s), bos, eos) for s in itertools.product(range(V), repeat=L))
        assert scores[b].item() == pytest.approx(best, abs=1e-5)


def test_beam_beats_greedy_where_greedy_is_misled():
    # From <s>: token 2 (p 0.6) leads only to poor continuations, token 3 (p 0.4) to a sure one.
    V, bos, eos = 4, 0, 1
    p = torch.full((1, V, V), 1e-9)
    p[0, bos, 2], p[0, bos, 3] = 0.6, 0.4
    p[0, 2, 2], p[0, 2, 3], p[0, 2, eos] = 1 / 3, 1 / 3, 1 / 3
    p[0, 3, eos] = 1.0
    table = p.log()
    greedy, g_score = nets.beam_search(markov_step(table), (torch.zeros(1, dtype=torch.long),), bos, eos, 1, 3)
    beam, b_score = nets.beam_search(markov_step(table), (torch.zeros(1, dtype=torch.long),), bos, eos, 2, 3)
    assert greedy[0, 0] == 2 and beam[0, :2].tolist() == [3, eos]
    assert b_score.item() == pytest.approx(math.log(0.4)) and b_score > g_score


# ---------------------------------------------------------------- attention over padding

@pytest.mark.parametrize("kind", ["additive", "dot"])
def test_attention_gives_padding_zero_weight(kind):
    torch.manual_seed(0)
    attn = nets.Attention(query_dim=8, key_dim=6, kind=kind)
    memory = torch.randn(3, 5, 6)
    lengths = torch.tensor([5, 2, 3])
    mask = nets.length_mask(lengths, 5)
    query = torch.randn(3, 8)
    context, weights = attn(query, attn.keys(memory), memory, mask)
    assert torch.all(weights[~mask] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    junk = memory.masked_fill(~mask.unsqueeze(-1), 1e4)  # whatever the padding holds
    context2, weights2 = attn(query, attn.keys(junk), junk, mask)
    torch.testing.assert_close(context2, context)
    torch.testing.assert_close(weights2, weights)
    for b, n in enumerate(lengths.tolist()):  # as if the row had never been padded
        c, w = attn(query[b:b + 1], attn.keys(memory[b:b + 1, :n]), memory[b:b + 1, :n], mask[b:b + 1, :n])
        torch.testing.assert_close(c[0], context[b])
        torch.testing.assert_close(w[0], weights[b, :n])


def test_seq2seq_ignores_source_padding():
    torch.manual_seed(0)
    model = nets.Seq2Seq(len(data.SOURCE_CHARS) + 4, len(data.TARGET_CHARS) + 4, cell="gru", embed=8, hidden=12).eval()
    src, lengths = data.pad_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    tgt = torch.tensor([[data.BOS, 5, 6], [data.BOS, 7, 8]])
    with torch.no_grad():
        logits, attn = model(src, lengths, tgt)
        alone, _ = model(src[1:, :3], lengths[1:], tgt[1:])
    torch.testing.assert_close(logits[1], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(attn[1, :, 3:] == 0)


# ---------------------------------------------------------------- packing round trip

@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_packed_run_equals_each_sequence_alone(cell):
    torch.manual_seed(0)
    rnn = nets.LAYERS[cell](5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    lengths = torch.tensor([3, 6, 1, 4])
    x = torch.randn(4, 6, 5).masked_fill(~nets.length_mask(lengths, 6).unsqueeze(-1), 99.0)
    with torch.no_grad():
        out, state = nets.run_packed(rnn, x, lengths)
        final = nets.last_layer_state(state, 2, bidirectional=True)
        for b, n in enumerate(lengths.tolist()):
            out_b, state_b = rnn(x[b:b + 1, :n])
            torch.testing.assert_close(out[b, :n], out_b[0], atol=1e-5, rtol=1e-5)
            assert torch.all(out[b, n:] == 0)  # pad_packed_sequence pads with zeros
            torch.testing.assert_close(final[b], nets.last_layer_state(state_b, 2, True)[0], atol=1e-5, rtol=1e-5)
    # the final state's halves are where the output says: forward at the last real step, backward at the first
    torch.testing.assert_close(final[:, :7], out[torch.arange(4), lengths - 1, :7])
    torch.testing.assert_close(final[:, 7:], out[:, 0, 7:])
    mean = nets.masked_mean(out, nets.length_mask(lengths, 6))
    torch.testing.assert_close(mean[1], out[1, :6].mean(0))
    torch.testing.assert_close(mean[2], out[2, 0])


def test_pad_batch_and_length_mask():
    ids, lengths = data.pad_batch([[4, 5], [6], [7, 8, 9]])
    assert ids.tolist() == [[4, 5, 0], [6, 0, 0], [7, 8, 9]] and lengths.tolist() == [2, 1, 3]
    assert nets.length_mask(lengths, 3).tolist() == [[True, True, False], [True, False, False], [True, True, True]]


# ---------------------------------------------------------------- initialisation and models

def test_init_recurrent_orthogonal_and_forget_bias():
    model = torch.nn.Sequential(rnnfast.LSTM(6, 8, num_layers=2), rnnfast.GRUCell(4, 8), rnnfast.RNN(3, 8))
    nets.init_recurrent(model, forget_bias=1.0)
    for name, p in model.named_parameters():
        if "weight_hh" in name:
            for block in p.detach().chunk(p.size(0) // 8):
                torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
        if name.startswith("0.bias_ih"):  # both LSTM layers
            assert p[8:16].eq(1).all() and p[:8].eq(0).all() and p[16:].eq(0).all()
        elif "bias" in name:
            assert p.eq(0).all(), name


def test_every_recurrent_core_is_rnnfast():
    models = [nets.SequenceClassifier(50, 5, cell=c) for c in nets.LAYERS]
    models += [nets.Seq2Seq(20, 15, cell=c) for c in nets.LAYERS]
    for model in models:
        cores = [m for m in model.modules() if isinstance(m, (torch.nn.RNNBase, torch.nn.RNNCellBase))]
        assert cores and all(isinstance(m, rnnfast.modules._BackendChoice) for m in cores)
    ids, lengths = data.pad_batch([[4, 5, 6], [7]])
    assert models[0](ids, lengths).shape == (2, 5)
    with pytest.raises(ValueError, match="readout"):
        nets.SequenceClassifier(50, 5, readout="max")


# ---------------------------------------------------------------- data

def test_dates_round_trip_to_iso():
    pairs = data.date_pairs(400, seed=3)
    assert pairs == data.date_pairs(400, seed=3)
    for human, iso in pairs:
        day = dt.date.fromisoformat(iso)
        assert data.FIRST_DAY <= day <= data.LAST_DAY
        assert set(human) <= set(data.SOURCE_CHARS) and set(iso) <= set(data.TARGET_CHARS)
    day = dt.date(2021, 3, 3)
    assert [f(day) for f in data.DATE_FORMATS] == [
        "3 March 2021", "March 3, 2021", "Mar 03 2021", "Wednesday, 3 Mar 2021", "the 3rd of March 2021",
        "03.03.2021", "3/3/21", "2021/3/3"]
    assert data.DATE_FORMATS[4](dt.date(1999, 1, 12)) == "the 12th of January 1999"


def test_speaker_data_split():
    d = data.speaker_data(n_speakers=3, seed=0)
    assert len(d.speakers) == 3 and d.speakers[0] == "GLOUCESTER"
    assert abs(len(d.test) - 0.2 * (len(d.train) + len(d.test))) <= 1
    assert all(0 < len(s) <= 80 and 0 <= y < 3 for s, y in d.train + d.test)
    assert 0.3 < d.majority_accuracy() < 0.6  # three speakers of similar frequency
    vocab = data.Vocab(["b", "a", "b"])
    assert vocab.itos == [*data.SPECIALS, "a", "b"] and vocab.encode(["a", "zz"], bos=True, eos=True) == [2, 4, 1, 3]
    assert vocab.decode([4, 5, data.EOS, 4]) == ["a", "b"]


# ---------------------------------------------------------------- the script

def test_tour_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rnn_tour", EXAMPLES / "recurrent_neural_networks.py")
    tour = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tour)
    summary = tour.main(["--seconds", "0.5", "--test-dates", "40", "--threads", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for heading in ("1. layers", "2. many-to-one", "3. encoder-decoder", "4. practice"):
        assert heading in printed
    assert all(r["max_abs_diff"] < 1e-5 for r in summary["layers"]["layers"])
    assert summary["layers"]["rnncell_loop_max_abs_diff"] < 1e-5
    assert set(summary["classification"]["runs"]) == {"final", "mean"}
    for run in summary["seq2seq"]["runs"].values():
        assert 0 <= run["greedy_exact_match"] <= 1 and 0 <= run["beam_exact_match"] <= 1 and run["steps"] > 0
    assert set(summary["seq2seq"]["runs"]) == {"rnn", "lstm", "gru"}
    for name in ("summary.json", "attention.png", "cells.png"):
        assert (tmp_path / name).stat().st_size > 0
