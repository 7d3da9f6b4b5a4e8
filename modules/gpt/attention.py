"""Attention math of the mini-GPT: masks, position schemes and the two attention paths.

Only torch is imported here. `CausalSelfAttention` in `model.py` projects to q, k, v and calls
`attention_sdpa` (F.scaled_dot_product_attention: FlashAttention/memory-efficient kernels where
the variant allows) or `attention_reference` (written out, for tests and teaching); both take the
same arguments and must agree to float precision for every variant:

- grouped-query attention (Ainslie et al. 2023): k, v carry n_kv_head heads, each shared by
  n_head // n_kv_head query heads (n_kv_head == n_head: multi-head; 1: multi-query, Shazeer 2019);
- a sliding window W (Longformer, Mistral): query i sees keys j with i - W < j <= i;
- ALiBi (Press et al. 2022): a per-head linear penalty -m_h (i - j) added to the scores.

RoPE (Su et al. 2021) rotates q and k before they get here (`apply_rope`), so cached keys are
stored rotated and attention sees relative positions only.

Shape legend: B batch, nh query heads, nkv key/value heads, Tq queries, Tk keys, hs head size.
Queries are always the LAST Tq of the Tk positions whose keys are given (the earlier ones come from
a KV cache), so query i and key j are (Tk - Tq + i) - j positions apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def relative_distance(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """(t_q, t_k) long tensor of query position minus key position (negative: a future key)."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return q_pos - k_pos


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where attention is allowed: causal, and with a sliding window
    W only the W most recent keys (the query's own included)."""
    d = relative_distance(t_q, t_k, device)
    allowed = d >= 0
    if window is not None:
        allowed &= d < window
    return allowed


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's head-specific slopes m_h (Press et al. 2022, section 3): for n heads a power of two,
    the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise those of the nearest lower
    power of two followed by every other slope of the next one (the authors' reference code)."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_two(n_head)
    else:
        lower = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes)


def score_bias(
    t_q: int, t_k: int, device: torch.device, window: int | None, slopes: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive score bias: 0 where allowed, -inf where masked, minus ALiBi's m_h (i - j) if
    slopes are given. (t_q, t_k), or (nh, t_q, t_k) with slopes."""
    allowed = causal_mask(t_q, t_k, device, window)
    if slopes is None:
        bias = torch.zeros(t_q, t_k, device=device, dtype=dtype)
    else:
        dist = relative_distance(t_q, t_k, device).to(dtype)
        bias = -slopes.to(device=device, dtype=dtype)[:, None, None] * dist  # (nh, t_q, t_k)
    return bias.masked_fill(~allowed, float("-inf"))


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout: nn.Module | None = None,
    window: int | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(QK^T / sqrt(hs) + bias) V with a causal (optionally windowed) mask, written out
    (Vaswani et al. 2017, eq. 1; ALiBi adds -m_h (i - j) to the scores before the softmax).

    q: (B, nh, Tq, hs); k, v: (B, nkv, Tk, hs) with Tk >= Tq and nkv dividing nh; alibi: (nh,)
    slopes or None. Returns (B, nh, Tq, hs).
    """
    group = q.size(1) // k.size(1)
    # GQA: query head h reads key/value head h // group (heads are grouped contiguously)
    k = k.repeat_interleave(group, dim=1)  # (B, nh, Tk, hs)
    v = v.repeat_interleave(group, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    if alibi is not None:
        dist = relative_distance(q.size(-2), k.size(-2), q.device).to(att.dtype)
        att = att - alibi.to(att.dtype)[:, None, None] * dist
    att = att.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device, window), float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout is not None:
        att = dropout(att)
    return att @ v


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    window: int | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same attention through F.scaled_dot_product_attention; shapes as `attention_reference`.

    Plain causal attention without a cache passes `is_causal` (the fused kernels); a window, ALiBi
    or a cache offset need an explicit mask, which SDPA takes as a boolean or additive tensor.
    GQA goes through `enable_gqa`, which reads each k/v head for its group without copying.
    """
    t_q, t_k = q.size(-2), k.size(-2)
    gqa = dict(enable_gqa=True) if k.size(1) != q.size(1) else {}
    if alibi is not None:
        mask = score_bias(t_q, t_k, q.device, window, alibi, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
    if window is None or window >= t_k:
        if t_q == t_k:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        if t_q == 1:  # one new query sees every cached key: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **gqa)
    mask = causal_mask(t_q, t_k, q.device, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)


def reference_saved_bytes(batch: int, n_head: int, t: int, head_size: int, element_size: int = 4) -> int:
    """Bytes `attention_reference` (causal, no window, ALiBi, dropout or GQA) saves for backward:
    the softmax output P (B, nh, T, T), which both softmax's and P @ V's backward read; the boolean
    causal mask (T, T) of `masked_fill`; and q, k, v for the two matmuls. Quadratic in T."""
    return element_size * batch * n_head * t * t + t * t + 3 * element_size * batch * n_head * t * head_size


def flash_saved_bytes(batch: int, n_head: int, t: int, head_size: int, element_size: int = 4) -> int:
    """Bytes a fused SDPA kernel (FlashAttention, CPU flash, memory-efficient) saves for backward:
    q, k, v, the output and the fp32 row log-sum-exp (B, nh, T), from which backward recomputes P
    block by block (Dao et al. 2022, Algorithm 4). Linear in T."""
    return 4 * element_size * batch * n_head * t * head_size + 4 * batch * n_head * t


# -- positions -------------------------------------------------------------------------------


def rope_cos_sin(
    pos: torch.Tensor, head_size: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles pos * base^(-2i / hs), each (T, hs): the hs/2 frequencies
    repeated for the two halves that `apply_rope` rotates against each other (the GPT-NeoX / Llama
    layout of Su et al.'s rotation). Computed for any positions, so there is no length limit."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + hs/2}) by its angle: x (B, h, T, hs); cos, sin (T, hs).
    The dot product of a rotated query and key then depends only on their distance (Su et al. eq. 16)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def sinusoidal_embedding(pos: torch.Tensor, n_embd: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vaswani et al. (2017, section 3.5) fixed positions, (T, C): sin on even channels, cos on odd,
    wavelengths from 2 pi to 10000 * 2 pi. Defined at every position, but never trained past the
    training length, which is what Press et al. measure."""
    inv_freq = 10000.0 ** (-torch.arange(0, n_embd, 2, device=pos.device, dtype=torch.float32) / n_embd)
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, C/2)
    out = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (T, C): sin, cos interleaved
    return out.to(dtype)


# -- cross-attention ---------------------------------------------------------------------------


def cross_attention(
    x: torch.Tensor,
    memory: torch.Tensor,
    w_q: torch.Tensor,
    w_kv: torch.Tensor,
    w_o: torch.Tensor,
    n_head: int,
    b_q: torch.Tensor | None = None,
    b_kv: torch.Tensor | None = None,
    b_o: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention whose queries come from `x` and whose keys and values come from `memory`
    (Vaswani et al. 2017, section 3.2.3: the decoder's queries read the encoder's output), written out.

    x: (B, Tq, C); memory: (B, Tk, Cm), Cm may differ from C (torch's kdim = vdim = Cm);
    w_q: (C, C), w_kv: (2C, Cm) (k's rows, then v's), w_o: (C, C), biases of those widths or None;
    key_padding_mask: (B, Tk), True where a key is padding (nn.MultiheadAttention's convention);
    causal: query i sees keys j <= i (only meaningful when both are the same positions).
    Returns y (B, Tq, C) and the attention weights (B, nh, Tq, Tk) that mixed the values.

    Self-attention is the special case memory = x (`self_attention`): nothing else differs, which is
    why the one function serves the encoder, the decoder and the decoder's cross-attention.
    """
    B, Tq, C = x.shape
    Tk = memory.size(1)
    if C % n_head:
        raise ValueError(f"cross_attention: width {C} must be divisible by n_head {n_head}")
    if memory.size(0) != B:
        raise ValueError(f"cross_attention: x has batch {B} but memory has {memory.size(0)}")
    hs = C // n_head
    q = F.linear(x, w_q, b_q).view(B, Tq, n_head, hs).transpose(1, 2)  # (B, nh, Tq, hs)
    k, v = F.linear(memory, w_kv, b_kv).split(C, dim=2)
    k = k.view(B, Tk, n_head, hs).transpose(1, 2)  # (B, nh, Tk, hs)
    v = v.view(B, Tk, n_head, hs).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, Tq, Tk)
    if causal:
        att = att.masked_fill(~causal_mask(Tq, Tk, x.device), float("-inf"))
    if key_padding_mask is not None:
        att = att.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = F.softmax(att, dim=-1)
    y = (dropout(weights) if dropout is not None else weights) @ v  # (B, nh, Tq, hs)
    y = y.transpose(1, 2).reshape(B, Tq, C)
    return F.linear(y, w_o, b_o), weights


def self_attention(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    w_o: torch.Tensor,
    n_head: int,
    b_qkv: torch.Tensor | None = None,
    b_o: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention as `cross_attention(x, x)`: w_qkv (3C, C) is the mini-GPT's fused `c_attn`
    weight (q's rows, then k's, then v's), split into the query and the key/value projections."""
    C = x.size(-1)
    b_q, b_kv = (None, None) if b_qkv is None else (b_qkv[:C], b_qkv[C:])
    return cross_attention(x, x, w_qkv[:C], w_qkv[C:], w_o, n_head, b_q, b_kv, b_o, key_padding_mask, causal,
                           dropout)
