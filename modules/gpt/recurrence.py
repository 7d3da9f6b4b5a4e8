"""Transformer-XL's segment-level recurrence (Dai et al. 2019, section 3.2) for the mini-GPT.

The text is read in contiguous segments of S tokens (`ContiguousBatches`: row b of batch s + 1
continues row b of batch s). Each layer n attends over its own input of the current segment and
the cached input of the previous one, with no gradient into the cache (eq. for h~ in 3.2):

    h~^{n-1}_tau = [SG(m^{n-1}_tau) o h^{n-1}_tau]      m: the last M states of segment tau - 1
    q = h^{n-1}_tau W_q,   k, v = h~^{n-1}_tau W_k, h~^{n-1}_tau W_v

so information moves one segment further back per layer: an L-layer model reaches about L x M
tokens at constant memory. Positions are relative, as the paper requires (absolute ones would
repeat from segment to segment): RoPE rotates the M memory keys by slots 0..M-1 and the segment by
M..M+S-1, so only distances enter the scores (ALiBi works the same way). The paper's own relative
encoding (its R, u, v terms) is replaced by RoPE here. At test time the same pattern is the
"segments" `CachePolicy` of `streaming.py`, token by token.

Shape legend: B batch, S segment, M memory, C width, nh heads, nkv key/value heads, hs head size.
Only torch is imported.
"""

from __future__ import annotations

import torch

from modules.gpt.attention import apply_rope, rope_cos_sin
from modules.gpt.model import GPT
from modules.gpt.streaming import project_qkv

Memory = list[torch.Tensor]  # per layer, (B, M', C) the input states of the previous segment, M' <= M


def memory_kv(block, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
    """Keys (rotated by slots 0..M'-1) and values a block computes from memory states h (B, M', C)."""
    _, k, v = project_qkv(block.attn, block.ln_1(h))  # (B, nkv, M', hs)
    if rope is not None:
        k = apply_rope(k, *rope)
    return k, v


def xl_forward(model: GPT, idx: torch.Tensor, mems: Memory | None, memory: int) -> tuple[torch.Tensor, Memory]:
    """Logits (B, S, V) of one segment idx (B, S) given the previous segment's states, and the
    states to carry to the next segment (the last `memory` inputs of every layer, detached).

    With mems None (the first segment) this is the model's ordinary causal forward.
    """
    c = model.config
    if c.pos_emb not in ("rope", "alibi"):
        raise ValueError(f"Transformer-XL recurrence needs relative positions (pos_emb='rope' or 'alibi'); "
                         f"pos_emb={c.pos_emb!r} would repeat absolute positions every segment")
    if c.sliding_window is not None:
        raise ValueError("Transformer-XL recurrence sets the span itself (memory + segment): leave sliding_window unset")
    B, S = idx.shape
    m = 0 if mems is None else mems[0].size(1)
    dev = idx.device
    x = model.transformer.drop(model.transformer.wte(idx))  # (B, S, C)
    rope_mem = rope_cur = None
    if c.pos_emb == "rope":
        cos, sin = rope_cos_sin(torch.arange(m + S, device=dev), c.head_size, c.rope_base, x.dtype)
        rope_mem, rope_cur = (cos[:m], sin[:m]), (cos[m:], sin[m:])
    new_mems = []
    for i, block in enumerate(model.transformer.h):
        kept = x.detach() if not m else torch.cat([mems[i], x.detach()], dim=1)  # M > S reaches further back
        new_mems.append(kept[:, max(kept.size(1) - memory, 0) :])
        past = memory_kv(block, mems[i], rope_mem) if m else None  # gradient reaches W_k, W_v, not the states
        a, _ = block.attn(block.ln_1(x), past, rope_cur)  # queries at slots m..m+S-1: causal offset by m
        x = x + a
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x)), new_mems
