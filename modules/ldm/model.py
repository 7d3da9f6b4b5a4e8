"""eps_theta(x_t, t, prompt) for a two-digit canvas: diffusers' UNet2DConditionModel, conditioned two ways.

The prompt is two tokens, (left class, right class), each in 0..9, or NULL (10) when dropped for
classifier-free guidance (Ho & Salimans 2022): a dropped prompt is two NULL tokens, in every variant.

conditioning="cross_attention" (Stable Diffusion's route, Rombach et al. 2022 sec. 3.3): the tokens
are embedded (a token table plus a position table, so "3 7" differs from "7 3") into a context
(B, 2, D); the UNet's transformer blocks attend from every position of the image (queries) to the
two tokens (keys, values): softmax(Q K^T / sqrt(d)) V, eq. 1 of the LDM paper. Each region can read
its own token, which is the routing this task needs.

conditioning="embedding" (the DDPM's route, one class embedding added to the time embedding): the
two tokens' embeddings are concatenated (B, 2E) and projected into the time embedding
(`class_embed_type="projection"`), so every position gets the same vector, and must learn from
position alone which half of it to draw. To keep the parameter count and the compute equal, the
UNet keeps its transformer blocks (self-attention, cross-attention, feed-forward), but their
context is one learned token: softmax over one key is 1 everywhere, so that cross-attention adds
one constant vector per position and carries no prompt (the trap named in issue 29).

The UNet never sees the schedule: modules/diffusion/schedule.py runs the sampling loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

Conditioning = Literal["cross_attention", "embedding"]
NUM_CLASSES = 10
NULL = NUM_CLASSES  # the dropped token
PROMPT_LEN = 2


@dataclass
class ConditionalDenoiserConfig:
    """Shape of the UNet and its conditioning.

    Args of the dataclass:
        in_channels: 1 for pixels, the VAE's latent channels for latents.
        height, width: the canvas (28 x 56) or its latent (7 x 14); any size works, diffusers
            aligns the upsampled maps with their skips when a side is odd.
        block_out_channels: channels per level (one halving between levels).
        cross_attention: a transformer block (self-attn, cross-attn, FF) per level, one bool each.
        layers_per_block: ResNet blocks per level.
        attention_head_dim: channels per attention head.
        context_dim: D, the width of a prompt token (UNet's cross_attention_dim).
        conditioning: "cross_attention" or "embedding" (see the module docstring).
        norm_num_groups: GroupNorm groups (must divide every width).
    """

    in_channels: int = 1
    height: int = 28
    width: int = 56
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    cross_attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    context_dim: int = 32
    conditioning: Conditioning = "cross_attention"
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.cross_attention = tuple(self.cross_attention)
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(f"cross_attention has {len(self.cross_attention)} entries but block_out_channels has "
                             f"{len(self.block_out_channels)} levels: give one bool per level")
        if not any(self.cross_attention):
            raise ValueError("cross_attention needs at least one True level, or the prompt has nowhere to enter "
                             "(the mid-block attends too, but the variants compare levels with attention)")
        if self.conditioning not in ("cross_attention", "embedding"):
            raise ValueError(f"conditioning must be 'cross_attention' or 'embedding', got {self.conditioning!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")
        if any(c % self.attention_head_dim for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be divisible by attention_head_dim={self.attention_head_dim}")


class ConditionalDenoiser(nn.Module):
    """eps_theta(x (B, C, H, W), t (B,) long, prompt (B, 2) long or None = dropped) -> (B, C, H, W)."""

    def __init__(self, config: ConditionalDenoiserConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        embed = c.conditioning == "embedding"
        self.tokens = nn.Embedding(NUM_CLASSES + 1, c.context_dim)  # 0..9 and NULL
        self.positions = nn.Parameter(torch.randn(PROMPT_LEN, c.context_dim) * 0.02) if not embed else None
        self.constant = nn.Parameter(torch.randn(1, 1, c.context_dim) * 0.02) if embed else None
        self.unet = UNet2DConditionModel(
            sample_size=(c.height, c.width),
            in_channels=c.in_channels,
            out_channels=c.in_channels,
            block_out_channels=c.block_out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.cross_attention),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.cross_attention)),
            layers_per_block=c.layers_per_block,
            cross_attention_dim=c.context_dim,
            attention_head_dim=c.attention_head_dim,
            norm_num_groups=c.norm_num_groups,
            # embedding: concat(two token embeddings) (B, 2D) -> a TimestepEmbedding added to temb
            class_embed_type="projection" if embed else None,
            projection_class_embeddings_input_dim=PROMPT_LEN * c.context_dim if embed else None,
        )

    def null_prompt(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch, PROMPT_LEN), NULL, dtype=torch.long, device=device)

    def context(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prompt (B, 2) long -> (encoder_hidden_states (B, L, D), class vector (B, 2D) or None)."""
        if prompt.dim() != 2 or prompt.shape[1] != PROMPT_LEN:
            raise ValueError(f"prompt must be (B, {PROMPT_LEN}) token ids (left class, right class), got {tuple(prompt.shape)}")
        if prompt.min() < 0 or prompt.max() > NULL:
            raise ValueError(f"prompt tokens must be classes 0..{NUM_CLASSES - 1} or NULL={NULL}, got {prompt.unique().tolist()}")
        emb = self.tokens(prompt)  # (B, 2, D)
        if self.config.conditioning == "embedding":
            return self.constant.expand(len(prompt), 1, -1), emb.flatten(1)
        return emb + self.positions, None

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        if prompt is None:
            prompt = self.null_prompt(len(x), x.device)
        ctx, cls = self.context(prompt)
        return self.unet(x, t, encoder_hidden_states=ctx, class_labels=cls).sample

    def guided(self, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance, eps_null + w (eps_prompt - eps_null), eq. 6 of Ho & Salimans (2022)
        rewritten with w = 1 + their w; w = 1 is plain conditional, w = 0 unconditional.

        `prompt` None means dropped: the unconditional eps whatever w. A prompt tensor always takes
        the two passes in one batch of 2B (no shortcut), so a prompt of NULL tokens exercises the
        same arithmetic and must give the unconditional eps too.
        """
        if prompt is None:
            return self(x, t, None)
        null = self.null_prompt(len(x), x.device)
        eps_p, eps_null = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([prompt, null])).chunk(2)
        return eps_null + guidance_scale * (eps_p - eps_null)


class CrossAttentionRecorder:
    """A diffusers attention processor for the cross-attention layers (`attn2`) that keeps their
    softmax weights: the computation of diffusers' `AttnProcessor`, plus `maps.append(probs)`.

    probs are (B * heads, N, L): for each of the N = h * w image positions, its weights over the L
    prompt tokens; `token_maps` averages them into "which token each region reads".
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        # hidden_states (B, N, C) from the transformer block; encoder_hidden_states (B, L, D)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B * heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(ctx))  # (B * heads, L, d)
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, None)  # softmax(q k^T * scale), (B * heads, N, L)
        self.maps.append(probs.detach().unflatten(0, (-1, attn.heads)).mean(1).cpu())  # (B, N, L), heads averaged
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


@contextmanager
def recording_cross_attention(net: ConditionalDenoiser) -> Iterator[CrossAttentionRecorder]:
    """Within the block, one recorder sits on every cross-attention layer of `net` (`attn2`); the
    layers' own processors come back afterwards."""
    recorder = CrossAttentionRecorder()
    saved = net.unet.attn_processors
    net.unet.set_attn_processor({name: recorder if name.endswith("attn2.processor") else proc
                                 for name, proc in saved.items()})
    try:
        yield recorder
    finally:
        net.unet.set_attn_processor(saved)


def token_maps(maps: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Average recorded cross-attention maps (each (B, h * w, L), any resolution) into (B, L, height, width).

    Each map is reshaped to its own grid (h, w) (the one with h * w = N and h / w = height / width
    up to the rounding of odd sides) and resized to (height, width), so levels can be averaged.
    """
    if not maps:
        raise ValueError("no cross-attention maps were recorded: call record_cross_attention(net) before the forward pass")
    out = []
    for m in maps:
        b, n, L = m.shape
        h, w = height, width
        while h * w > n:  # the UNet's halvings, ceil as its strided convolutions do
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w != n:
            raise ValueError(f"a map of {n} positions matches no halving of {height} x {width}")
        grid = m.transpose(1, 2).reshape(b, L, h, w)
        out.append(nn.functional.interpolate(grid, size=(height, width), mode="nearest"))
    return torch.stack(out).mean(0)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
