"""The noise-prediction network eps_theta(x_t, t, y): diffusers' UNet2DModel, small enough for a CPU.

The DDPM math lives in `schedule.py`; this file only knows images, timesteps and class labels.
Class conditioning uses the UNet's label embedding with one extra "null" label, so the same
network is conditional and unconditional and classifier-free guidance (Ho & Salimans, 2022)
needs no second model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from torch import nn


@dataclass
class DiffusionConfig:
    """Shape of the UNet.

    image_size must be divisible by 2**(len(block_out_channels) - 1): with 3 levels, 28 -> 14 -> 7
    and 32 -> 16 -> 8 both work. attention[i] puts self-attention in level i (cheap at 7x7).
    num_classes = 0 builds an unconditional model.
    """

    image_size: int = 28
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention: tuple[bool, ...] = (False, False, True)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_classes: int = 10
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention = tuple(self.attention)
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels needs at least one level, e.g. (32, 64, 64)")
        if len(self.attention) != levels:
            raise ValueError(
                f"attention has {len(self.attention)} entries but block_out_channels has {levels} levels: give one bool per level"
            )
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**{levels - 1} (one halving per level after the first): "
                "pad the images to 32 (MNISTDataModule pad_to_32=True) or use fewer levels"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")


class Denoiser(nn.Module):
    """eps_theta(x_t, t, y) -> predicted noise, same shape as x_t."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
        self.unet = UNet2DModel(
            sample_size=config.image_size,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            block_out_channels=config.block_out_channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            attention_head_dim=None,  # one head per attention block: the maps are 7x7
            dropout=config.dropout,
            # label k in [0, num_classes) plus the null label num_classes (dropped condition)
            num_class_embeds=config.num_classes + 1 if config.num_classes else None,
        )

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy images, t (B,) long timesteps, y (B,) long labels or None (= null label)."""
        if self.config.num_classes:
            if y is None:
                y = torch.full_like(t, self.null_label)
        elif y is not None:
            raise ValueError("this Denoiser is unconditional (num_classes=0) but labels were given")
        return self.unet(x, t, class_labels=y).sample

    def guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance: eps_null + w (eps_y - eps_null); w = 1 is plain conditional, w = 0 unconditional.

        The conditional and null passes share one batch of 2B.
        """
        if y is None or not self.config.num_classes or guidance_scale == 1.0:
            return self(x, t, y if guidance_scale != 0.0 else None)
        null = torch.full_like(y, self.null_label)
        eps_y, eps_null = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return eps_null + guidance_scale * (eps_y - eps_null)
