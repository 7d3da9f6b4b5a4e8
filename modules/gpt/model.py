"""A decoder-only transformer (GPT-2 style, pre-LayerNorm) in the shape of nanoGPT.

Only torch is imported here: the LightningModule that trains this lives in `module.py`,
the Mixture-of-Experts feed-forward in `moe.py`, the attention math (masks, GQA, sliding windows,
RoPE, ALiBi) in `attention.py`. Parameter names follow nanoGPT / GPT-2
(`transformer.wte/wpe/h/ln_f`, `lm_head`, `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`) because LoRA and checkpoint loading elsewhere depend on them.

Shape legend: B batch, T time, C n_embd, nh n_head, nkv n_kv_head, hs head size (C // nh), V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.gpt.attention import (  # noqa: F401  (causal_mask, attention_reference: re-exported)
    alibi_slopes,
    apply_rope,
    attention_reference,
    attention_sdpa,
    causal_mask,
    rope_cos_sin,
    sinusoidal_embedding,
)
from modules.gpt.moe import MoE, Router

POS_EMBS = ("learned", "sinusoidal", "rope", "alibi")
NORMS = ("layernorm", "rmsnorm")
MLP_ACTS = ("gelu", "relu2")
SINUSOIDAL_SCALE = 0.02 * math.sqrt(2.0)  # RMS of the fixed table = the learned table's init std

# One layer's cached keys and values: (k, v), each (B, nkv, T_kept, hs).
LayerCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class KVCache:
    """What `generate` keeps of earlier positions: per layer the rotated keys and the values.

    A full-attention layer keeps every position; a layer with a sliding window W keeps only the last
    W (a rolling buffer: older keys can never be attended to again), so its memory stops growing.
    `length` counts every position seen, the position of the next token.
    """

    layers: list[LayerCache]
    length: int

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def bytes_per_token(self) -> float:
        """Bytes one position costs, summed over layers and measured from the tensors: each layer's
        bytes over the positions it holds and the batch (equals GPT.kv_bytes_per_token_formula)."""
        return sum((k.nbytes + v.nbytes) / (k.size(0) * k.size(2)) for k, v in self.layers)


@dataclass
class GPTConfig:
    """Model hyper-parameters; the feed-forward and attention kinds are chosen here at build time.

    Args:
        vocab_size: Number of token ids (the tokenizer's vocabulary).
        block_size: Longest context; also the size of the learned position table.
        n_layer: Transformer blocks.
        n_head: Attention heads per block; must divide `n_embd`.
        n_embd: Residual stream width C.
        dropout: Dropout on attention weights, residual branches and embeddings.
        bias: Biases in Linear layers and LayerNorms (GPT-2: True; nanoGPT's small presets: False).
        attention: "sdpa" (F.scaled_dot_product_attention, FlashAttention on a GPU) or
            "reference" (explicit softmax(QK^T / sqrt(hs)) V, for tests and teaching).
        n_kv_head: Key/value heads, each shared by n_head // n_kv_head query heads: None or
            n_head is multi-head attention, 1 multi-query (Shazeer 2019), in between grouped-query
            (Ainslie et al. 2023). The KV cache shrinks by n_head / n_kv_head.
        sliding_window: None (full causal attention), W (every query sees its W most recent
            positions, itself included), or a list with one W or None per layer.
        pos_emb: "learned" (GPT-2's table of block_size rows: no position past it exists),
            "sinusoidal" (Vaswani et al.'s fixed table, added like the learned one), "rope"
            (rotary, Su et al. 2021: q and k rotated by position) or "alibi" (Press et al. 2022:
            linear distance penalty on the scores). The last three run at any length.
        rope_base: RoPE's base theta: frequencies base^(-2i / hs).
        norm: "layernorm" (GPT-2; with `bias`) or "rmsnorm" (Zhang & Sennrich 2019, as in Llama:
            x / RMS(x) * g, no mean subtraction and no bias), before attention, MLP and the head.
        mlp_hidden: Hidden width of the dense MLP; None means 4 * n_embd. Lets a GQA/MQA model
            spend the attention parameters it saves on the MLP, for comparisons at equal size.
        ffn: "mlp" (GELU MLP, 4C hidden) or "moe" (Mixture-of-Experts, see `moe.py`).
        n_experts: MoE experts per MoE layer.
        top_k: Experts each token is routed to.
        expert_hidden: Hidden width of each expert; None means 4 * n_embd like the dense MLP.
            With top_k=2, `2 * n_embd` matches the dense model's active parameters per token.
        moe_every: Use MoE in every k-th block (blocks k-1, 2k-1, ...); the rest stay dense.
        capacity_factor: Training capacity per expert = ceil(factor * tokens * top_k / n_experts);
            assignments beyond it are dropped (their token passes through the residual only).
        eval_capacity_factor: Capacity factor in eval mode (Switch uses a larger one at eval).
        dropless: Ignore capacity factors: every assignment is computed.
        aux_loss_coef: Switch Transformer load-balancing loss coefficient (0 disables it).
        z_loss_coef: ST-MoE router z-loss coefficient.
        shared_expert: Add one always-on expert (hidden `expert_hidden`) next to the routed ones.
        noisy_topk: Shazeer et al. (2017) noisy top-k gating: learned Gaussian noise on the
            router logits during training.

        The modded-nanogpt speedrun's architecture ideas, each off by default (GPT-2/nanoGPT):
        qk_norm: RMS-normalise every head's queries and keys (no gain) before RoPE and the dot
            product, which bounds the attention logits (Dehghani et al. 2023; Wortsman et al. 2023).
        mlp_act: "gelu" (GPT-2) or "relu2", ReLU(x)^2 (So et al. 2021, Primer), in the dense MLP.
        zero_init_proj: Zero-initialise every block's output projections (attn.c_proj, mlp.c_proj,
            MoE w_proj), so each block starts as the identity on the residual stream.
        tie_weights: Share the token embedding with the output head (Press & Wolf 2017); False
            gives lm_head weights of its own.
        logit_softcap: None, or c > 0: logits = c * tanh(logits / c) (Gemma 2), bounded by c.
    """

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    attention: str = "sdpa"
    n_kv_head: int | None = None
    sliding_window: int | list[int | None] | None = None
    pos_emb: str = "learned"
    rope_base: float = 10000.0
    norm: str = "layernorm"
    mlp_hidden: int | None = None
    ffn: str = "mlp"
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None
    moe_every: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    dropless: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    shared_expert: bool = False
    noisy_topk: bool = False
    qk_norm: bool = False
    mlp_act: str = "gelu"
    zero_init_proj: bool = False
    tie_weights: bool = True
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_experts", "top_k", "moe_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("sdpa", "reference"):
            raise ValueError(f"GPTConfig.attention must be 'sdpa' or 'reference', got {self.attention!r}")
        if self.n_kv_head is not None and (
            not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0 or self.n_head % self.n_kv_head != 0
        ):
            raise ValueError(
                f"GPTConfig.n_kv_head ({self.n_kv_head!r}) must be a positive divisor of n_head ({self.n_head}): "
                "each key/value head serves an equal group of query heads (None: one per query head)"
            )
        windows = self.sliding_window if isinstance(self.sliding_window, list) else [self.sliding_window]
        if isinstance(self.sliding_window, list) and len(windows) != self.n_layer:
            raise ValueError(
                f"GPTConfig.sliding_window lists {len(windows)} windows for n_layer={self.n_layer} layers; "
                "give one per layer (null for full attention) or a single integer for all"
            )
        if any(w is not None and (not isinstance(w, int) or w <= 0) for w in windows):
            raise ValueError(f"GPTConfig.sliding_window must be a positive integer, None or a list of them, "
                             f"got {self.sliding_window!r}")
        if self.norm not in NORMS:
            raise ValueError(f"GPTConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"GPTConfig.pos_emb must be one of {POS_EMBS}, got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_size % 2:
            raise ValueError(f"GPTConfig.pos_emb='rope' rotates pairs of channels: head size n_embd // n_head "
                             f"must be even, got {self.head_size}")
        if self.pos_emb == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"GPTConfig.pos_emb='sinusoidal' needs an even n_embd, got {self.n_embd}")
        if self.rope_base <= 1.0:
            raise ValueError(f"GPTConfig.rope_base must be > 1, got {self.rope_base}")
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden <= 0):
            raise ValueError(f"GPTConfig.mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}")
        if self.ffn not in ("mlp", "moe"):
            raise ValueError(f"GPTConfig.ffn must be 'mlp' or 'moe', got {self.ffn!r}")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"GPTConfig.top_k ({self.top_k}) must be <= n_experts ({self.n_experts})"
            )
        if self.expert_hidden is not None and self.expert_hidden <= 0:
            raise ValueError(f"GPTConfig.expert_hidden must be positive or None, got {self.expert_hidden}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be > 0 (use dropless=True for no dropping)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"GPTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"GPTConfig.mlp_act must be one of {MLP_ACTS}, got {self.mlp_act!r}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"GPTConfig.logit_softcap must be a positive cap or None (no cap), got {self.logit_softcap!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def window(self, layer: int) -> int | None:
        """The sliding window of block `layer` (0-based), None for full attention."""
        if isinstance(self.sliding_window, list):
            return self.sliding_window[layer]
        return self.sliding_window

    @property
    def expert_width(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else 4 * self.n_embd

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) uses the MoE feed-forward."""
        return self.ffn == "moe" and (layer + 1) % self.moe_every == 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_size = config.head_size
        self.n_embd = config.n_embd
        self.window = config.window(layer)
        self.dropout = config.dropout
        self.use_sdpa = config.attention == "sdpa"
        self.qk_norm = config.qk_norm
        # q (C) and k, v (nkv * hs each) for all heads in one matmul; with nkv == nh this is
        # GPT-2's c_attn of width 3C, so MHA checkpoints load unchanged
        self.kv_width = self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.pos_emb == "alibi":
            self.register_buffer("alibi", alibi_slopes(config.n_head), persistent=False)
        else:
            self.alibi = None

    def forward(
        self,
        x: torch.Tensor,
        past: LayerCache | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, LayerCache]:
        """x: (B, T, C); past: cached (k, v) of earlier positions; rope: (cos, sin) of the T new
        positions, each (T, hs). Returns (y, this layer's new cache)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split([self.n_embd, self.kv_width, self.kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        if self.qk_norm:  # unit RMS per head: |q.k| / sqrt(hs) <= sqrt(hs), whatever the weights grow to
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, T_kept + T, hs)
            v = torch.cat([past[1], v], dim=2)
        if self.use_sdpa:
            p = self.dropout if self.training else 0.0
            y = attention_sdpa(q, k, v, p, self.window, self.alibi)
        else:
            y = attention_reference(q, k, v, self.attn_dropout, self.window, self.alibi)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        if self.window is not None:  # rolling buffer: no later query reaches further back than W
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = nn.GELU() if config.mlp_act == "gelu" else ReLU2()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class ReLU2(nn.Module):
    """ReLU(x)^2 (Primer, So et al. 2021): as cheap as ReLU, and smooth at 0 unlike it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def build_ffn(config: GPTConfig, layer: int) -> nn.Module:
    """The feed-forward of block `layer`: chosen from the config when the model is built."""
    if config.is_moe_layer(layer):
        c = config
        shared = MLP(c, hidden=c.expert_width) if c.shared_expert else None
        return MoE(Router(c.n_embd, c.n_experts, c.top_k, c.noisy_topk), c.n_embd, c.expert_width, c.capacity_factor,
                   c.eval_capacity_factor, c.dropless, c.bias, c.dropout, shared)
    return MLP(config, config.mlp_hidden)


def build_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (Llama): torch's own, at torch's default eps."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = build_norm(config)
        self.mlp = build_ffn(config, layer)

    def forward(
        self, x: torch.Tensor, past: LayerCache | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, LayerCache]:
        a, cache = self.attn(self.ln_1(x), past, rope)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, cache


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=build_norm(config),
        )
        if config.pos_emb != "learned":  # the other schemes have no trained position parameters
            del modules["wpe"]
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:  # weight tying (Press & Wolf 2017): the output projection reuses the token embedding
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), since each block adds two
        # branches to the residual stream and its variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("w_proj"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init_proj:  # drawn first all the same, so the other weights match the default's
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default as in nanoGPT (token
        embeddings stay in: tied to lm_head they are used as output weights)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def num_active_params(self, non_embedding: bool = True) -> int:
        """Parameters one token passes through: routed experts count top_k of n_experts."""
        n = self.num_params(non_embedding)
        for block in self.transformer.h:
            inactive = getattr(block.mlp, "inactive_params", None)
            if inactive is not None:
                n -= inactive()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward + backward: 6 N_active + 12 L C T (Kaplan et al.
        2020 / PaLM appendix B; the second term is attention's QK^T and AV at full context)."""
        c = self.config
        return 6 * self.num_active_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def kv_bytes_per_token_formula(self, dtype: torch.dtype = torch.float32) -> int:
        """KV-cache bytes one position costs: 2 (k and v) x n_layer x n_kv_head x hs x dtype bytes."""
        c = self.config
        return 2 * c.n_layer * c.kv_heads * c.head_size * torch.empty((), dtype=dtype).element_size()

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the position scheme allows: block_size rows of a learned table;
        None (no limit) for the schemes computed from the position."""
        return self.config.block_size if self.config.pos_emb == "learned" else None

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids; targets: (B, T) next-token ids (-1 ignored) or None.

        Returns logits (B, T, V) and the mean cross-entropy (None without targets). MoE
        auxiliary losses are not part of it: read them with `aux_loss()` after the call.
        """
        logits, _ = self._forward(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def _forward(self, idx: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) of idx (B, T), the positions after those in `past`, and the cache
        extended by them (a new object: `past` is left as it was)."""
        B, T = idx.size()
        t0 = 0 if past is None else past.length
        if self.max_positions is not None and t0 + T > self.max_positions:
            raise ValueError(
                f"sequence length {t0 + T} exceeds block_size {self.config.block_size}, the rows of the "
                "learned position table; crop the context to the last block_size tokens, or use "
                "pos_emb='rope', 'alibi' or 'sinusoidal', which run at any length"
            )
        pos = torch.arange(t0, t0 + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        elif self.config.pos_emb == "sinusoidal":
            # at the token embeddings' scale: GPT-2's init gives them (and a learned table) std 0.02,
            # while sin/cos have RMS 1/sqrt(2); unscaled, position would drown the token identity
            # (Vaswani et al. scale the tokens up by sqrt(C) instead, which the tied lm_head forbids)
            x = x + SINUSOIDAL_SCALE * sinusoidal_embedding(pos, self.config.n_embd, x.dtype)
        elif self.config.pos_emb == "rope":
            rope = rope_cos_sin(pos, self.config.head_size, self.config.rope_base, x.dtype)
        x = self.transformer.drop(x)
        caches = []
        for i, block in enumerate(self.transformer.h):
            x, cache = block(x, None if past is None else past.layers[i], rope)
            caches.append(cache)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        if self.config.logit_softcap is not None:  # smooth clamp to (-c, c)
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits, KVCache(caches, t0 + T)

    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        """(block index, MoE module) for every MoE block."""
        return [(i, b.mlp) for i, b in enumerate(self.transformer.h) if hasattr(b.mlp, "router")]

    def aux_loss(self) -> torch.Tensor:
        """Weighted sum of the MoE load-balancing and z losses of the last forward (0 if dense)."""
        total = self.lm_head.weight.new_zeros(())
        for _, moe in self.moe_layers():
            if moe.last_losses is not None:
                aux, z = moe.last_losses
                total = total + self.config.aux_loss_coef * aux + self.config.z_loss_coef * z
        return total

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        With `use_cache` the keys/values of earlier positions are kept (`KVCache`; a rolling
        buffer of W positions in sliding-window layers), so each step runs the model on one token.
        Once the sequence outgrows block_size every step re-runs the last block_size tokens, which
        is exactly what the uncached path does, for every position scheme: a learned table has no
        row past block_size, and with RoPE or ALiBi a longer cache would give the deeper layers
        context the uncached path does not see. temperature 0 means greedy.
        """
        check_sampling(idx, max_new_tokens, temperature, top_k)
        bs = self.config.block_size
        past = None
        for _ in range(max_new_tokens):
            if use_cache and past is not None and idx.size(1) <= bs:
                logits, past = self._forward(idx[:, -1:], past)
            else:
                logits, past = self._forward(idx[:, -bs:])
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if not use_cache:
                past = None
        return idx


def check_sampling(idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """The arguments of a `generate`, each refused with what it must be."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must be a non-empty (B, T) tensor of token ids, got shape {tuple(idx.shape)}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token (B, 1) from the last position's logits (B, V): greedy at temperature 0, else
    sampled from the softmax at `temperature`, restricted to the `top_k` likeliest."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
