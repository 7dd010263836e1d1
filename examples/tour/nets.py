"""Models and helpers of the tour: packing, initialisation, a classifier, an attention
encoder-decoder, beam search and a time-budgeted training loop.

Every recurrent core is an rnnfast layer (``RNN``, ``LSTM``, ``GRU``) or cell
(``RNNCell``, ``LSTMCell``, ``GRUCell``), chosen by the name ``"rnn"``, ``"lstm"``
or ``"gru"``.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast

from .data import BOS, EOS, PAD

LAYERS = {"rnn": rnnfast.RNN, "lstm": rnnfast.LSTM, "gru": rnnfast.GRU}
CELLS = {"rnn": rnnfast.RNNCell, "lstm": rnnfast.LSTMCell, "gru": rnnfast.GRUCell}
State = Union[Tensor, tuple[Tensor, Tensor]]


# ---------------------------------------------------------------- padding and packing

def length_mask(lengths: Tensor, steps: int) -> Tensor:
    """``(B, steps)`` bool, True on the first ``lengths[b]`` steps of row b (the real tokens)."""
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def run_packed(rnn: nn.RNNBase, x: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
    """Run a batch-first layer over padded ``x`` ``(B, T, E)`` as a ``PackedSequence``.

    The layer sees each row only up to its length (no step over padding, so the
    final state is the state after the last real token, and the backward
    direction starts there); outputs come back padded with zeros to ``T``.
    """
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    return out, state


def last_layer_state(state: State, num_layers: int, bidirectional: bool) -> Tensor:
    """The last layer's final ``h`` as ``(B, D*H)``: forward and backward directions side by side."""
    h = state[0] if isinstance(state, tuple) else state
    h = h.view(num_layers, 2 if bidirectional else 1, h.size(-2), h.size(-1))[-1]
    return torch.cat(list(h), dim=-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, T, D)`` over the steps where ``mask`` ``(B, T)`` is True."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def init_recurrent(model: nn.Module, forget_bias: float = 1.0) -> nn.Module:
    """Initialise every recurrent layer and cell of ``model`` in place; returns ``model``.

    Each gate's recurrent matrix orthogonal (keeps the state's norm through many
    steps at the start), input matrices Xavier-uniform, biases zero, and the
    LSTM forget gate's bias ``forget_bias`` (remember by default early on).
    """
    for m in model.modules():
        if not isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            continue
        is_lstm = isinstance(m, (nn.LSTM, nn.LSTMCell))
        for name, p in m.named_parameters():
            gates = p.size(0) // m.hidden_size
            with torch.no_grad():
                if name.startswith("weight_hh"):
                    for block in p.chunk(gates):
                        nn.init.orthogonal_(block)
                elif name.startswith("weight_ih"):
                    for block in p.chunk(gates):
                        nn.init.xavier_uniform_(block)
                elif name.startswith("bias"):
                    p.zero_()
                    if is_lstm and name.startswith("bias_ih"):  # torch's gate order: input, forget, cell, output
                        p[m.hidden_size:2 * m.hidden_size] = forget_bias
    return model


# ---------------------------------------------------------------- many-to-one classification

class SequenceClassifier(nn.Module):
    """Embedding -> stacked bidirectional rnnfast layer over packed input -> linear.

    ``readout="final"`` classifies from the last layer's final states (forward
    and backward); ``"mean"`` from the outputs averaged over the real tokens.
    """

    def __init__(self, vocab_size: int, classes: int, cell: str = "lstm", embed: int = 64, hidden: int = 96,
                 layers: int = 2, dropout: float = 0.3, readout: str = "final") -> None:
        super().__init__()
        if readout not in ("final", "mean"):
            raise ValueError(f"readout must be 'final' or 'mean', got {readout!r}")
        self.readout = readout
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=PAD)
        self.rnn = LAYERS[cell](embed, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                                dropout=dropout)  # dropout between the stacked layers
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, classes)
        init_recurrent(self)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Class logits ``(B, classes)`` for padded ids ``(B, T)`` of the given lengths."""
        out, state = run_packed(self.rnn, self.drop(self.embed(ids)), lengths)
        if self.readout == "final":
            feats = last_layer_state(state, self.rnn.num_layers, bidirectional=True)
        else:
            feats = masked_mean(out, length_mask(lengths, ids.size(1)))
        return self.head(self.drop(feats))


# ---------------------------------------------------------------- encoder-decoder with attention

class Attention(nn.Module):
    """Additive (Bahdanau) or dot-product (Luong "general") attention over encoder outputs.

    Padded source positions get weight exactly 0: their scores are set to
    -inf before the softmax, so what the padding holds cannot leak in.
    """

    def __init__(self, query_dim: int, key_dim: int, kind: str = "additive", attn_dim: int = 64) -> None:
        super().__init__()
        if kind not in ("additive", "dot"):
            raise ValueError(f"attention kind must be 'additive' or 'dot', got {kind!r}")
        self.kind = kind
        if kind == "additive":
            self.key_proj = nn.Linear(key_dim, attn_dim, bias=False)
            self.query_proj = nn.Linear(query_dim, attn_dim)
            self.v = nn.Linear(attn_dim, 1, bias=False)
        else:
            self.key_proj = nn.Linear(key_dim, query_dim, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """Projected keys of ``memory`` ``(B, S, key_dim)``: computed once per source."""
        return self.key_proj(memory)

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Context ``(B, key_dim)`` and weights ``(B, S)`` for ``query`` ``(B, query_dim)``; ``mask`` True = real."""
        if self.kind == "additive":
            scores = self.v(torch.tanh(keys + self.query_proj(query).unsqueeze(1))).squeeze(-1)
        else:
            scores = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)
        weights = scores.masked_fill(~mask, -math.inf).softmax(-1)
        return torch.bmm(weights.unsqueeze(1), memory).squeeze(1), weights


class Seq2Seq(nn.Module):
    """Bidirectional rnnfast encoder over the packed source, rnnfast cell decoder with attention.

    Each decoder step takes the previous target token and the previous
    context (input feeding), updates the cell, attends over the encoder
    outputs and predicts the next token from the state and the new context.
    The decoder's state is a tuple of batch-first tensors, so beam search can
    reorder it without knowing the cell.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, cell: str = "lstm", embed: int = 32, hidden: int = 64,
                 attention: str = "additive") -> None:
        super().__init__()
        self.cell_kind = cell
        self.src_embed = nn.Embedding(src_vocab, embed, padding_idx=PAD)
        self.encoder = LAYERS[cell](embed, hidden, bidirectional=True, batch_first=True)
        self.bridge = nn.Linear(2 * hidden, hidden)
        self.tgt_embed = nn.Embedding(tgt_vocab, embed, padding_idx=PAD)
        self.decoder = CELLS[cell](embed + 2 * hidden, hidden)
        self.attention = Attention(hidden, 2 * hidden, attention)
        self.out = nn.Linear(hidden + 2 * hidden, tgt_vocab)
        init_recurrent(self)

    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        """The decoder's starting state: ``(h, [c,] context, memory, keys, mask)``."""
        memory, state = run_packed(self.encoder, self.src_embed(src), lengths)
        h = torch.tanh(self.bridge(last_layer_state(state, 1, bidirectional=True)))
        mask = length_mask(lengths, src.size(1))
        cell = (h, torch.zeros_like(h)) if self.cell_kind == "lstm" else (h,)
        return (*cell, memory.new_zeros(memory.size(0), memory.size(2)), memory, self.attention.keys(memory), mask)

    def step(self, tokens: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """One decoder step: logits ``(B, V)``, the next state and the attention weights ``(B, S)``."""
        *cell, context, memory, keys, mask = state
        x = torch.cat([self.tgt_embed(tokens), context], -1)
        if self.cell_kind == "lstm":
            cell = list(self.decoder(x, tuple(cell)))
        else:
            cell = [self.decoder(x, cell[0])]
        context, weights = self.attention(cell[0], keys, memory, mask)
        logits = self.out(torch.cat([cell[0], context], -1))
        return logits, (*cell, context, memory, keys, mask), weights

    def forward(self, src: Tensor, lengths: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: logits ``(B, T, V)`` for target inputs ``(B, T)``, and attention ``(B, T, S)``."""
        state = self.encode(src, lengths)
        logits, attn = [], []
        for t in range(tgt_in.size(1)):
            out, state, weights = self.step(tgt_in[:, t], state)
            logits.append(out)
            attn.append(weights)
        return torch.stack(logits, 1), torch.stack(attn, 1)

    @torch.no_grad()
    def translate(self, src: Tensor, lengths: Tensor, max_len: int, width: int = 1) -> tuple[Tensor, Tensor]:
        """Decoded ids ``(B, <= max_len)`` (ending in ``</s>``, then ``</s>`` padding) and their log-probabilities.

        ``width=1`` is greedy decoding; wider runs beam search.
        """
        def step(tokens: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
            logits, state, _ = self.step(tokens, state)
            return logits.log_softmax(-1), state

        return beam_search(step, self.encode(src, lengths), BOS, EOS, width, max_len)

    @torch.no_grad()
    def attention_map(self, src: Tensor, lengths: Tensor, ids: Tensor) -> Tensor:
        """Attention weights ``(B, T, S)`` while decoding the given output ids ``(B, T)``."""
        tgt_in = torch.cat([torch.full_like(ids[:, :1], BOS), ids[:, :-1]], 1)
        return self(src, lengths, tgt_in)[1]


def beam_search(step: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]],
                state: tuple[Tensor, ...], bos: int, eos: int, width: int, max_len: int) -> tuple[Tensor, Tensor]:
    """Batched beam search; returns the best sequence per row ``(B, <= max_len)`` and its log-probability ``(B,)``.

    ``state`` holds tensors whose first dimension is the batch B; ``step(tokens,
    state)`` maps the last tokens ``(N,)`` and a state of N rows to next-token
    log-probabilities ``(N, V)`` and the next state. The K = ``width`` beams of
    each row run as one batch of B*K rows; every step keeps the K best
    extensions by total log-probability and reorders the state to match. A beam
    that has emitted ``eos`` is finished: it keeps its score and is padded with
    ``eos``. ``width=1`` is greedy decoding. Scores are not length-normalised.
    """
    B, K = state[0].size(0), width
    state = tuple(s.repeat_interleave(K, 0) for s in state)
    device = state[0].device
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: extend only the first
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    seqs = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device).unsqueeze(1) * K
    for _ in range(max_len):
        logp, state = step(tokens, state)
        V = logp.size(-1)
        logp = logp.view(B, K, V)
        done_row = torch.full((V,), -math.inf, device=device)
        done_row[eos] = 0.0
        logp = torch.where(finished.unsqueeze(-1), done_row, logp)
        best = (scores.unsqueeze(-1) + logp).view(B, K * V).topk(K, dim=-1)
        beam, tok = best.indices // V, best.indices % V
        scores = best.values
        seqs = torch.cat([seqs.gather(1, beam.unsqueeze(-1).expand(-1, -1, seqs.size(2))), tok.unsqueeze(-1)], -1)
        finished = finished.gather(1, beam) | (tok == eos)
        order = (rows + beam).view(-1)
        state = tuple(s.index_select(0, order) for s in state)
        tokens = tok.view(-1)
        if bool(finished.all()):
            break
    return seqs[:, 0], scores[:, 0]


# ---------------------------------------------------------------- training

def train_for(model: nn.Module, batches: Iterator, loss_fn: Callable[..., Tensor], seconds: float,
              lr: float = 3e-3, clip: float = 1.0, max_steps: Optional[int] = None) -> dict:
    """Adam for ``seconds`` of wall time (or ``max_steps``), gradient-norm clipping at ``clip``.

    ``loss_fn(model, batch)`` gives the loss of one batch drawn from ``batches``. Returns the steps
    taken, the loss curve ``[(seconds, mean loss since the last point)]``, and
    how often clipping acted (the fraction of steps whose gradient norm
    exceeded ``clip``, and the largest norm seen).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    steps = clipped = 0
    max_norm, curve, window = 0.0, [], []
    while time.perf_counter() - t0 < seconds and (max_steps is None or steps < max_steps):
        loss = loss_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
        opt.step()
        steps, clipped, max_norm = steps + 1, clipped + (norm > clip), max(max_norm, norm)
        window.append(loss.item())
        if len(window) == 25:
            curve.append((time.perf_counter() - t0, sum(window) / len(window)))
            window.clear()
    if window:
        curve.append((time.perf_counter() - t0, sum(window) / len(window)))
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "curve": curve,
            "clipped_fraction": clipped / max(steps, 1), "max_grad_norm": max_norm}


def shuffled_batches(items: list, batch: int, seed: int = 0) -> Iterator[list]:
    """Endless mini-batches of ``items``, reshuffled every pass."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(items), generator=gen).tolist()
        for k in range(0, len(perm) - batch + 1, batch):
            yield [items[i] for i in perm[k:k + batch]]
