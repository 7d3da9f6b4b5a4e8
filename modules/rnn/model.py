"""Character-level recurrent language models: the sequence models before the transformer.

Only torch is imported here; `module.py` trains them through the same pipeline, datamodule and
tokenizer as the mini-GPT. The recurrence is torch's (`nn.LSTM`, `nn.GRU`, `nn.RNN`) or, for
teaching, `HandLSTM`: the LSTM cell written out (`LSTMCell`, checked against torch's to 1e-6), run by
a Python loop over time.

An LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000), in torch's gate
order i, f, g, o:

    i, f, o = sigmoid(W_i[x, h]), sigmoid(W_f[x, h]), sigmoid(W_o[x, h]);  g = tanh(W_g[x, h])
    c' = f * c + i * g                (the additive cell path: gradient flows through f, not through W)
    h' = o * tanh(c')

A plain RNN's h' = tanh(W[x, h]) multiplies the gradient by W^T diag(1 - h'^2) at every step back,
so it shrinks (or grows) geometrically with distance (Bengio et al. 1994); the LSTM's c path does not.

Shape legend: B batch, T time, E n_embd, H n_hidden, L n_layer, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.gpt.model import check_sampling, sample_next

CELLS = ("lstm", "gru", "rnn", "hand-lstm")
# The recurrent state: (h, c) for LSTMs, each (L, B, H); h alone for the GRU and the plain RNN.
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class CharRNNConfig:
    """Model hyper-parameters.

    Args:
        vocab_size: Number of token ids (the tokenizer's vocabulary).
        cell: "lstm" (nn.LSTM), "gru" (nn.GRU), "rnn" (nn.RNN, tanh: the vanishing-gradient baseline)
            or "hand-lstm" (`HandLSTM`: the same maths as "lstm", written out).
        n_layer: Stacked recurrent layers.
        n_embd: Width of the token embedding fed to the first layer.
        n_hidden: Hidden (and cell) state width H of every layer.
        dropout: Dropout on the embeddings, between layers and before the head.
    """

    vocab_size: int = 65
    cell: str = "lstm"
    n_layer: int = 2
    n_embd: int = 64
    n_hidden: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_embd", "n_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CharRNNConfig.{name} must be a positive integer, got {value!r}")
        if self.cell not in CELLS:
            raise ValueError(f"CharRNNConfig.cell must be one of {CELLS}, got {self.cell!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CharRNNConfig.dropout must be in [0, 1), got {self.dropout}")


class LSTMCell(nn.Module):
    """One LSTM step, written out; parameters named and laid out as `nn.LSTMCell`'s, so its
    state dict loads into torch's cell and back (gates stacked i, f, g, o along the rows)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        bound = hidden_size ** -0.5  # torch's init: U(-1/sqrt(H), 1/sqrt(H)) for every parameter
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, I); state (h, c), each (B, H) -> (h', c')."""
        h, c = state
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)  # (B, 4H)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class HandLSTM(nn.Module):
    """A stack of `LSTMCell`s looped over time, with nn.LSTM's (batch_first) call signature."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.cells = nn.ModuleList(
            LSTMCell(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """x (B, T, I); state (h0, c0), each (L, B, H) -> out (B, T, H), (hT, cT) each (L, B, H)."""
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            h, c = state[0][layer], state[1][layer]
            outs = []
            for t in range(x.size(1)):
                h, c = cell(x[:, t], (h, c))
                outs.append(h)
            x = torch.stack(outs, dim=1)  # (B, T, H)
            if layer < len(self.cells) - 1:
                x = self.drop(x)  # between layers, as nn.LSTM's dropout
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))


def build_recurrence(config: CharRNNConfig) -> nn.Module:
    """The recurrent core, chosen by `config.cell` when the model is built."""
    drop = config.dropout if config.n_layer > 1 else 0.0
    args = (config.n_embd, config.n_hidden, config.n_layer)
    if config.cell == "hand-lstm":
        return HandLSTM(*args, dropout=drop)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
    return cls(*args, dropout=drop, batch_first=True)


class CharRNN(nn.Module):
    """Embedding -> recurrence -> linear head, next-token logits at every position."""

    def __init__(self, config: CharRNNConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = build_recurrence(config)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        c = self.config
        h = torch.zeros(c.n_layer, batch, c.n_hidden, device=device)
        return (h, torch.zeros_like(h)) if c.cell in ("lstm", "hand-lstm") else h

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: State | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """idx (B, T) token ids; targets (B, T) next-token ids or None; state from the previous window
        (None: zeros). Returns logits (B, T, V), the mean cross-entropy (None without targets) and the
        state after the last position, which a caller detaches to carry into the next window
        (truncated backpropagation through time)."""
        if state is None:
            state = self.init_state(idx.size(0), idx.device)
        x = self.drop(self.wte(idx))  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        logits = self.lm_head(self.drop(out))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, state

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        The prompt is read once; after that each step feeds one token and the carried state, so a
        step costs the same at any length (the state is the whole memory: no cache, no window).
        temperature 0 means greedy.
        """
        check_sampling(idx, max_new_tokens, temperature, top_k)
        logits, _, state = self(idx)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            logits, _, state = self(nxt, state=state)
        return idx
