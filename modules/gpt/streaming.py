"""Context without end at constant memory: bounded KV caches, attention sinks, and the streaming scorer.

A trained mini-GPT reads one long stream token by token. After each token its KV cache keeps only
the positions a `CachePolicy` allows, so memory stops growing:

- ``dense``: every position (the growing cache of `GPT.generate`); linear memory.
- ``window``: the W most recent positions (itself included), a rolling buffer.
- ``sinks``: the first k positions of the stream and the W most recent (StreamingLLM, Xiao et al.
  2023, arXiv 2309.17453: window attention collapses once the first tokens are evicted, because
  the model parks surplus attention on them; keeping k = 4 of them recovers it).
- ``segments``: Transformer-XL's pattern (Dai et al. 2019): the previous segment of S tokens (its
  last M) and the current one so far; `recurrence.py` trains a model for it.

Keys are cached BEFORE RoPE. At every step each cached key is rotated by its SLOT in the cache, and
the query by the last slot (StreamingLLM section 3.2: positions are assigned inside the cache), so
distances never exceed what the cache spans; ALiBi's penalty is likewise m_h (slot_q - slot_k). For
dense, window and segments the slots keep every distance as it was in the text; only the sinks are
moved next to the window.

A *learned* sink (`sink_logit`) is one more logit per head in the softmax with no value behind it:
softmax([QK^T / sqrt(hs), s_h]) drops its last column, so a head can attend to nothing (as some
2025 open-weight models ship; Miller's "off-by-one" softmax is s_h = 0). `SinkAttention` trains it.

Shape legend: B batch, nh heads, nkv key/value heads, n cached positions, hs head size, C width.
Only torch is imported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.gpt.attention import apply_rope, causal_mask, relative_distance, rope_cos_sin
from modules.gpt.model import GPT, CausalSelfAttention

POLICIES = ("dense", "window", "sinks", "segments")


@dataclass(frozen=True)
class CachePolicy:
    """Which earlier positions a query at stream position t may still see (and the cache keeps).

    Args:
        kind: "dense", "window", "sinks" or "segments" (see the module docstring).
        window: W, the recent positions kept by "window" and "sinks" (the query's own included).
        sinks: k, the first positions of the stream kept by "sinks".
        segment: S, the segment length of "segments" (the model's training block).
        memory: M, the positions of the previous segment kept by "segments" (Transformer-XL's mem).
    """

    kind: str = "dense"
    window: int | None = None
    sinks: int = 0
    segment: int | None = None
    memory: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"CachePolicy.kind must be one of {POLICIES}, got {self.kind!r}")
        if self.kind in ("window", "sinks") and (self.window is None or self.window < 1):
            raise ValueError(f"CachePolicy(kind={self.kind!r}) needs window >= 1 (the rolling cache W), got {self.window}")
        if self.kind == "sinks" and self.sinks < 1:
            raise ValueError(f"CachePolicy(kind='sinks') needs sinks >= 1 (StreamingLLM keeps 4), got {self.sinks}")
        if self.kind == "segments" and (not self.segment or self.segment < 1 or self.memory is None or self.memory < 0):
            raise ValueError("CachePolicy(kind='segments') needs segment >= 1 (the training block) and memory >= 0 "
                             f"(Transformer-XL's M), got segment={self.segment}, memory={self.memory}")

    def keep(self, pos: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """True where a query at stream position t may attend to position pos <= t (broadcasts)."""
        if self.kind == "dense":
            return pos <= t
        if self.kind in ("window", "sinks"):
            recent = (pos <= t) & (pos > t - self.window)
            return recent | (pos < self.sinks) if self.kind == "sinks" else recent
        start = (t // self.segment) * self.segment - self.memory  # first position of the kept memory
        return (pos <= t) & (pos >= start)

    @property
    def capacity(self) -> int | None:
        """The most positions the cache ever holds; None: unbounded (dense)."""
        return {"dense": None, "window": self.window, "sinks": (self.window or 0) + self.sinks,
                "segments": (self.segment or 0) + (self.memory or 0)}[self.kind]


def policy_mask(policy: CachePolicy, t: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (t, t) mask over absolute stream positions: row i is what query i sees."""
    pos = torch.arange(t, device=device)
    return policy.keep(pos[None, :], pos[:, None]) & causal_mask(t, t, device)


# -- attention with a learned sink ------------------------------------------------------------------


def project_qkv(attn: CausalSelfAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, nh, T, hs), k and v (B, nkv, T, hs), un-rotated, from a block's normed input h (B, T, C)."""
    B, T, _ = h.shape
    q, k, v = attn.c_attn(h).split([attn.n_embd, attn.kv_width, attn.kv_width], dim=2)
    heads = (attn.n_head, attn.n_kv_head, attn.n_kv_head)
    return tuple(t.view(B, T, nh, attn.head_size).transpose(1, 2) for t, nh in zip((q, k, v), heads))


def sink_softmax(scores: torch.Tensor, sink_logit: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last axis of scores (B, nh, Tq, Tk) with one extra logit s_h per head whose
    column is dropped: rows then sum to 1 - exp(s_h) / (exp(s_h) + sum_j exp(score_j)) < 1."""
    if sink_logit is None:
        return F.softmax(scores, dim=-1)
    sink = sink_logit.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return F.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


class SinkAttention(CausalSelfAttention):
    """`CausalSelfAttention` with a learned per-head sink logit, trained with the model (written-out
    attention: SDPA has no extra softmax column). Loads the same weights plus `sink_logit` (nh,)."""

    def __init__(self, config, layer: int = 0):
        super().__init__(config, layer)
        self.sink_logit = nn.Parameter(torch.zeros(config.n_head))

    def forward(self, x, past=None, rope=None):
        B, T, C = x.size()
        q, k, v = project_qkv(self, x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        group = self.n_head // self.n_kv_head
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, Tk, hs)
        att = (q @ kk.transpose(-2, -1)) / math.sqrt(self.head_size)  # (B, nh, T, Tk)
        if self.alibi is not None:
            att = att - self.alibi.to(att.dtype)[:, None, None] * relative_distance(T, k.size(2), x.device).to(att.dtype)
        att = att.masked_fill(~causal_mask(T, k.size(2), x.device, self.window), float("-inf"))
        y = self.attn_dropout(sink_softmax(att, self.sink_logit)) @ vv
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        if self.window is not None:
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        return self.resid_dropout(self.c_proj(y)), (k, v)


def add_sink_logits(model: GPT) -> GPT:
    """Give every block of a freshly built GPT a `SinkAttention` (its own init, then the sink at 0)."""
    for i, block in enumerate(model.transformer.h):
        old = block.attn
        block.attn = SinkAttention(model.config, i)
        block.attn.load_state_dict(old.state_dict(), strict=False)
    return model


# -- the streaming scorer ---------------------------------------------------------------------------


class BoundedKVCache:
    """One layer's cache: un-rotated keys, values and the stream position of each, evicted by a policy."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.k = self.v = self.pos = None  # (1, nkv, n, hs), (1, nkv, n, hs), (n,)
        self.k_rot = None  # the keys rotated by their slots, kept while no eviction shifts the slots

    def append(self, k: torch.Tensor, v: torch.Tensor, t: int) -> None:
        """Add position t's key and value (1, nkv, 1, hs), then drop what no later query can see."""
        pos = torch.tensor([t], device=k.device)
        if self.k is None:
            self.k, self.v, self.pos = k, v, pos
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.pos = torch.cat([self.pos, pos])
        keep = self.policy.keep(self.pos, t)
        if not bool(keep.all()):
            self.k, self.v, self.pos = self.k[:, :, keep], self.v[:, :, keep], self.pos[keep]
            self.k_rot = None

    def rotated(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The keys rotated by slots 0..n-1 (cos, sin: (>= n, hs)); only the newest is rotated while
        nothing was evicted (dense, and between the segment ends of "segments")."""
        n = self.k.size(2)
        if self.k_rot is not None and self.k_rot.size(2) == n - 1:
            new = apply_rope(self.k[:, :, -1:], cos[n - 1 : n], sin[n - 1 : n])
            self.k_rot = torch.cat([self.k_rot, new], dim=2)
        else:
            self.k_rot = apply_rope(self.k, cos[:n], sin[:n])
        return self.k_rot

    def __len__(self) -> int:
        return 0 if self.pos is None else self.pos.numel()

    def nbytes(self) -> int:
        """Bytes of the keys and values: what a deployment must hold (the rotated copy can be rebuilt
        from them, and the positions are bookkeeping of this scorer)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


@dataclass
class StreamResult:
    """What streaming one text through a model measured.

    losses: (N,) cross-entropy of each next token; cache_bytes: (N,) cache bytes after each token
    (all layers); first_share: (L,) mean attention share on the first `share_slots` cache slots per
    layer, over the queries once the cache is full (or the stream's second half for dense);
    sink_share: (L,) mean probability mass taken by the learned sink logit (zeros without one);
    seconds: wall time of the loop; max_cached: the most positions any layer held.
    """

    losses: torch.Tensor
    cache_bytes: torch.Tensor
    first_share: torch.Tensor
    sink_share: torch.Tensor
    seconds: float
    max_cached: int

    def bucket_loss(self, start: int, end: int) -> float:
        return self.losses[start:end].mean().item()

    def bytes_slope(self) -> float:
        """Cache bytes added per token over the stream's second half: 0 for a bounded cache, the
        per-position cost of a growing one."""
        n = len(self.cache_bytes)
        half = n // 2
        return (self.cache_bytes[-1] - self.cache_bytes[half - 1]).item() / max(n - half, 1)


def _check_streamable(model: GPT) -> None:
    c = model.config
    if c.pos_emb not in ("rope", "alibi"):
        raise ValueError(f"streaming assigns positions inside the cache, which needs pos_emb='rope' or 'alibi' (relative); "
                         f"this model was trained with pos_emb={c.pos_emb!r}, whose positions are added to the tokens")
    if c.sliding_window is not None or c.ffn != "mlp":
        raise ValueError("the streaming scorer runs dense-MLP models without sliding_window (the policy is its window); "
                         f"got sliding_window={c.sliding_window!r}, ffn={c.ffn!r}")
    if c.qk_norm or c.logit_softcap is not None:  # its attention and logits are its own (project_qkv, lm_head)
        raise ValueError("the streaming scorer has no QK-norm or logit soft-cap yet; stream a model trained with "
                         f"qk_norm=false and logit_softcap=null (got qk_norm={c.qk_norm!r}, logit_softcap={c.logit_softcap!r})")


@torch.inference_mode()
def stream_score(model: GPT, tokens: torch.Tensor, policy: CachePolicy, share_slots: int = 4) -> StreamResult:
    """Score tokens (N + 1,) one at a time: the loss of token t + 1 given what the cache holds at t.

    Each layer caches k before RoPE; the query at step t attends to the n cached keys at slots
    0..n-1 (itself the last), rotated (or ALiBi-penalised) by slot. The model must be in eval mode.
    """
    _check_streamable(model)
    c, dev = model.config, tokens.device
    nh, nkv, hs = c.n_head, c.kv_heads, c.head_size
    group, n_steps = nh // nkv, tokens.numel() - 1
    caches = [BoundedKVCache(policy) for _ in range(c.n_layer)]
    cap = policy.capacity or n_steps
    cos, sin = rope_cos_sin(torch.arange(cap, device=dev), hs, c.rope_base) if c.pos_emb == "rope" else (None, None)
    losses = torch.empty(n_steps, device=dev)
    cache_bytes = torch.empty(n_steps, dtype=torch.float64)
    share_sum = torch.zeros(c.n_layer, dtype=torch.float64)
    sink_sum = torch.zeros(c.n_layer, dtype=torch.float64)
    counted, max_cached = 0, 0
    start = time.perf_counter()
    for t in range(n_steps):
        x = model.transformer.wte(tokens[t].view(1, 1))  # (1, 1, C)
        count_now = (policy.capacity is not None and t >= policy.capacity) or (policy.capacity is None and t >= n_steps // 2)
        for i, block in enumerate(model.transformer.h):
            attn = block.attn
            q, k, v = project_qkv(attn, block.ln_1(x))  # (1, nh, 1, hs), (1, nkv, 1, hs) x 2
            caches[i].append(k, v, t)
            kc, vc = caches[i].k, caches[i].v  # (1, nkv, n, hs)
            n = kc.size(2)
            if cos is not None:  # rotate by slot: keys 0..n-1, the query n-1
                kc, q = caches[i].rotated(cos, sin), apply_rope(q, cos[n - 1 : n], sin[n - 1 : n])
            kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)  # (1, nh, n, hs)
            scores = (q @ kc.transpose(-2, -1)) / math.sqrt(hs)  # (1, nh, 1, n)
            if attn.alibi is not None:
                dist = (n - 1 - torch.arange(n, device=dev)).to(scores.dtype)
                scores = scores - attn.alibi.to(scores.dtype)[:, None, None] * dist
            sink = getattr(attn, "sink_logit", None)
            p = sink_softmax(scores, sink)
            if count_now:
                share_sum[i] += p[..., :share_slots].sum(-1).mean().item()
                sink_sum[i] += 1.0 - p.sum(-1).mean().item()
            y = (p @ vc).transpose(1, 2).reshape(1, 1, c.n_embd)
            x = x + attn.c_proj(y)
            x = x + block.mlp(block.ln_2(x))
            max_cached = max(max_cached, n)
        counted += int(count_now)
        logits = model.lm_head(model.transformer.ln_f(x))[0, 0]  # (V,)
        losses[t] = F.cross_entropy(logits.float()[None], tokens[t + 1].view(1))
        cache_bytes[t] = sum(cache.nbytes() for cache in caches)
    seconds = time.perf_counter() - start
    counted = max(counted, 1)
    return StreamResult(losses.cpu(), cache_bytes, (share_sum / counted).float(), (sink_sum / counted).float(),
                        seconds, max_cached)


@torch.no_grad()
def masked_forward(model: GPT, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference the scorer must match: the whole of idx (B, T) in one pass, each query seeing the
    keys of a boolean (T, T) mask, positions the absolute ones. Logits (B, T, V). Written out (quadratic)."""
    c = model.config
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device)
    rope = rope_cos_sin(pos, c.head_size, c.rope_base) if c.pos_emb == "rope" else None
    x = model.transformer.wte(idx)
    for block in model.transformer.h:
        attn = block.attn
        q, k, v = project_qkv(attn, block.ln_1(x))
        k, v = (t.repeat_interleave(c.n_head // c.kv_heads, dim=1) for t in (k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c.head_size)
        if attn.alibi is not None:
            att = att - attn.alibi[:, None, None] * relative_distance(T, T, idx.device).to(att.dtype)
        att = sink_softmax(att.masked_fill(~mask, float("-inf")), getattr(attn, "sink_logit", None))
        x = x + attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, c.n_embd))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))
