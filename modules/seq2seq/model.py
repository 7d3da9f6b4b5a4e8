"""Three ways for a target sequence to read a source sequence, built from the mini-GPT's blocks.

- "cross": an encoder-decoder transformer (Vaswani et al. 2017; the Annotated Transformer's layout,
  pre-LayerNorm): encoder blocks with bidirectional self-attention, decoder blocks with causal
  self-attention, then cross-attention to the encoder's output, then the MLP.
- "pooled": the same encoder, and a decoder that sees only the mean of the encoder's outputs,
  projected and added to every decoder input: the fixed-length summary c of Cho et al. (2014), the
  bottleneck that Bahdanau et al. (2015) removed with attention.
- "decoder-only": one causal stack (the mini-GPT itself) over [source; BOS; target; EOS], where the
  target reads the source through self-attention alone.

The encoder's attention and the decoder's cross-attention go through
`modules.gpt.attention.cross_attention`: the encoder's as `self_attention` (memory = x) with no causal
mask, the cross-attention with memory = the encoder's output. The decoders' causal self-attention is
the mini-GPT's own `CausalSelfAttention` (SDPA), and the decoder-only arm is the mini-GPT's `GPT`.

Positions are the GPT's sinusoidal table (Vaswani et al. section 3.5, at the token embeddings'
scale), added to the embeddings in every arm: defined at any length, so the test can run strings
twice as long as any seen in training (no learned row is missing; whether the model extrapolates is
what the test measures). Parameters are matched across arms by the MLP widths:
with n_layer L per stack and width C, "cross" has L encoder blocks (12C^2) and L decoder blocks
(16C^2: self, cross and MLP); "pooled" drops cross-attention's 4C^2 and widens the decoder MLP to 6C
(plus the C^2 summary projection); "decoder-only" runs 2L blocks with a 5C MLP (14C^2 each).

Shape legend: B batch, S source length, T target length (+1 for BOS/EOS), C n_embd, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from datamodules.seq2seq import Vocab
from modules.gpt.attention import cross_attention, self_attention, sinusoidal_embedding
from modules.gpt.model import GPT, SINUSOIDAL_SCALE, Block, GPTConfig, build_norm

ARMS = ("cross", "pooled", "decoder-only")


@dataclass
class Seq2SeqConfig:
    """Args:
    n_symbols: Alphabet size; the vocabulary adds BOS, EOS, PAD (`datamodules.seq2seq.Vocab`).
    arm: "cross", "pooled" or "decoder-only" (see the module docstring).
    n_layer: Blocks per stack (encoder and decoder); the decoder-only arm runs 2 * n_layer.
    n_head: Attention heads.
    n_embd: Residual width C.
    dropout: Dropout on attention weights, residual branches and embeddings.
    """

    n_symbols: int = 10
    arm: str = "cross"
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"Seq2SeqConfig.arm must be one of {ARMS}, got {self.arm!r}")
        if self.n_symbols < 2:
            raise ValueError(f"Seq2SeqConfig.n_symbols must be >= 2, got {self.n_symbols}")
        self.gpt("encoder")  # GPTConfig checks the widths and heads

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.n_symbols)

    def gpt(self, stack: str) -> GPTConfig:
        """The GPTConfig of one stack: "encoder", "decoder" (of cross/pooled) or the decoder-only GPT."""
        c = self.n_embd
        base = GPTConfig(vocab_size=self.vocab.size, block_size=1024, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=c, dropout=self.dropout, bias=False, pos_emb="sinusoidal", mlp_hidden=4 * c)
        if self.arm == "decoder-only":
            return replace(base, n_layer=2 * self.n_layer, mlp_hidden=5 * c)
        if stack == "decoder" and self.arm == "pooled":
            return replace(base, mlp_hidden=6 * c)
        return base


class CrossAttention(nn.Module):
    """Queries from the decoder's stream, keys and values from the encoder's output (C wide both)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.weights: torch.Tensor | None = None  # (B, nh, T, S) of the last call, for the attention maps

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor) -> torch.Tensor:
        y, w = cross_attention(x, memory, self.c_q.weight, self.c_kv.weight, self.c_proj.weight, self.n_head,
                               self.c_q.bias, self.c_kv.bias, self.c_proj.bias, memory_pad, dropout=self.attn_dropout)
        self.weights = w.detach()
        return self.resid_dropout(y)


class EncoderBlock(Block):
    """A mini-GPT block whose self-attention sees every source position (no causal mask), padding excluded:
    the block's own c_attn/c_proj weights run through `self_attention`."""

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        a = self.attn
        y, _ = self_attention(self.ln_1(x), a.c_attn.weight, a.c_proj.weight, a.n_head, a.c_attn.bias, a.c_proj.bias,
                              key_padding_mask=pad, dropout=a.attn_dropout)
        x = x + a.resid_dropout(y)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(Block):
    """A mini-GPT block (causal self-attention, MLP) with cross-attention between them when `cross`."""

    def __init__(self, config: GPTConfig, layer: int, cross: bool):
        super().__init__(config, layer)
        self.ln_x = build_norm(config) if cross else None
        self.cross = CrossAttention(config) if cross else None

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))[0]
        if self.cross is not None:
            x = x + self.cross(self.ln_x(x), memory, memory_pad)
        return x + self.mlp(self.ln_2(x))


def teacher_forcing(tgt: torch.Tensor, tgt_len: torch.Tensor, vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input [BOS; tgt] and targets [tgt; EOS] with -1 past the EOS, each (B, T + 1)."""
    B, T = tgt.shape
    pos = torch.arange(T + 1, device=tgt.device)[None, :]
    dec_in = torch.cat([tgt.new_full((B, 1), vocab.bos), tgt], dim=1)
    targets = torch.cat([tgt, tgt.new_full((B, 1), vocab.pad)], dim=1)
    targets = torch.where(pos == tgt_len[:, None], vocab.eos, targets)
    return dec_in, targets.masked_fill(pos > tgt_len[:, None], -1)


def decoder_only_layout(src: torch.Tensor, src_len: torch.Tensor, tgt: torch.Tensor, tgt_len: torch.Tensor,
                        vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [src; BOS; tgt] and next-token targets (EOS after the target's last token), -1 on the
    source positions and the padding: each (B, S + T + 1), every row right-padded."""
    B, S = src.shape
    T = tgt.size(1)
    n = S + T + 2  # the full row [src; BOS; tgt; EOS] before the shift
    j = torch.arange(n, device=src.device)[None, :].expand(B, n)
    ls, lt = src_len[:, None], tgt_len[:, None]
    row = torch.full((B, n), vocab.pad, dtype=src.dtype, device=src.device)
    row = torch.where(j < ls, src.gather(1, j.clamp(max=S - 1)), row)
    row = torch.where(j == ls, vocab.bos, row)
    in_tgt = (j > ls) & (j <= ls + lt)
    row = torch.where(in_tgt, tgt.gather(1, (j - ls - 1).clamp(0, T - 1)), row)
    row = torch.where(j == ls + lt + 1, vocab.eos, row)
    targets = row[:, 1:].masked_fill((j[:, 1:] <= ls) | (j[:, 1:] > ls + lt + 1), -1)
    return row[:, :-1], targets


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.vocab = config.vocab
        if config.arm == "decoder-only":
            self.gpt = GPT(config.gpt("decoder"))
            return
        enc, dec = config.gpt("encoder"), config.gpt("decoder")
        self.wte = nn.Embedding(self.vocab.size, config.n_embd)  # shared by both stacks, tied to lm_head
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(enc, i) for i in range(config.n_layer)])
        self.ln_enc = build_norm(enc)
        self.decoder = nn.ModuleList([DecoderBlock(dec, i, config.arm == "cross") for i in range(config.n_layer)])
        self.summary = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.arm == "pooled" else None
        self.ln_f = build_norm(dec)
        self.lm_head = nn.Linear(config.n_embd, self.vocab.size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(GPT._init_weights)
        for name, p in self.named_parameters():  # GPT-2's residual scaling over all 2L blocks
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * 2 * config.n_layer))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + SINUSOIDAL_SCALE * sinusoidal_embedding(pos, self.config.n_embd, self.wte.weight.dtype)
        return self.drop(x)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output (B, S, C) and the source padding mask (B, S), True on padding."""
        pad = torch.arange(src.size(1), device=src.device)[None, :] >= src_len[:, None]
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, pad)
        return self.ln_enc(x), pad

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt: torch.Tensor, tgt_len: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T', V) under teacher forcing and the targets they are scored on (B, T'), -1 where
        none: T' = T + 1 for the encoder-decoders, S + T + 1 for the decoder-only arm."""
        if self.config.arm == "decoder-only":
            idx, targets = decoder_only_layout(src, src_len, tgt, tgt_len, self.vocab)
            return self.gpt(idx)[0], targets
        memory, pad = self.encode(src, src_len)
        dec_in, targets = teacher_forcing(tgt, tgt_len, self.vocab)
        x = self._embed(dec_in)
        if self.summary is not None:  # Cho et al.'s c: the mean of the real source positions, at every step
            keep = (~pad).unsqueeze(-1).to(memory.dtype)
            c = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, C)
            x = x + self.summary(c)[:, None, :]
        for block in self.decoder:
            x = block(x, memory, pad)
        return self.lm_head(self.ln_f(x)), targets

    @torch.no_grad()
    def source_attention(self, src: torch.Tensor, tgt: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, (nh, T + 1, S): how much each target-emitting position attends to each source
        position, for one unpadded pair src (S,), tgt (T,). Cross-attention weights for "cross"; for
        "decoder-only" the self-attention rows from BOS to the target's last token over the source
        columns (recomputed from each block's input with `self_attention`). "pooled" has none."""
        if self.config.arm == "pooled":
            raise ValueError("the pooled arm has no attention from the target to the source")
        S, T = src.numel(), tgt.numel()
        args = (src[None], torch.tensor([S]), tgt[None], torch.tensor([T]))
        if self.config.arm == "cross":
            self(*args)
            return [b.cross.weights[0] for b in self.decoder]
        inputs: list[torch.Tensor] = []
        blocks = self.gpt.transformer.h
        hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in blocks]
        try:
            self(*args)
        finally:
            for h in hooks:
                h.remove()
        maps = []
        for b, x in zip(blocks, inputs):
            _, w = self_attention(x, b.attn.c_attn.weight, b.attn.c_proj.weight, b.attn.n_head, causal=True)
            maps.append(w[0, :, S : S + T + 1, :S])
        return maps


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every scored position's argmax is its target. Under teacher forcing this is exactly
    whether greedy decoding reproduces the target: if every step's argmax is right given a right
    prefix, greedy decoding's prefix is always right (induction), and the first wrong argmax is
    where greedy decoding goes wrong too."""
    return ((logits.argmax(-1) == targets) | (targets < 0)).all(dim=1)
