"""The first stage of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", arXiv:2112.10752, sec. 3.1): a KL-regularised convolutional VAE whose
latent is a small image, 4 x 7 x 7 per 28 x 28 digit (a downsampling factor f = 4).

The network is diffusers' `AutoencoderKL`, the class of Stable Diffusion's autoencoder, at toy
width. The KL term is `modules.vae.model.gaussian_kl` (Kingma & Welling's closed form, shared with
the MLP VAE), applied per latent element: the posterior is N(mu, diag(exp(logvar))) over C x h x w.
Latent diffusion weights it lightly (LDM's "KL-reg", 1e-6 in their configs): the latent only needs
to stay near a unit-scale Gaussian, not to be a good prior sample space, because the diffusion
model learns the prior.

The scale factor (LDM sec. 4.3.2 and appendix G; Stable Diffusion's 0.18215): the latents are
multiplied by 1 / std(z) before diffusion, so the DDPM's forward process, built for unit-variance
data, meets unit-variance latents. `latent_scale_factor` computes it; decoding divides it back out.

A 28 x 56 canvas is encoded one 28 x 28 half at a time and the two 4 x 7 x 7 latents are put side by
side (4 x 7 x 14), so each latent column holds exactly one digit, as the VAE saw in training.
Pure PyTorch: no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from modules.vae.model import gaussian_kl, reparameterize


@dataclass
class SpatialVAEConfig:
    """Shape of the autoencoder: len(block_out_channels) - 1 halvings, so 3 levels give 28 -> 7.

    Args of the dataclass:
        image_size: side of the square images it is trained on (28).
        block_out_channels: encoder widths per level (the decoder mirrors them).
        latent_channels: C of the latent (Stable Diffusion's 4).
        layers_per_block: ResNet blocks per level.
        norm_num_groups: GroupNorm groups (must divide every width).
    """

    image_size: int = 28
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level, e.g. (16, 32, 32)")
        if self.image_size % self.factor:
            raise ValueError(f"image_size={self.image_size} is not divisible by the downsampling factor {self.factor} "
                             f"(2 ** (levels - 1)): use fewer levels in block_out_channels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")

    @property
    def factor(self) -> int:
        """f, the downsampling factor: 28 / f is the latent's side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor


class SpatialVAE(nn.Module):
    """x (B, 1, H, W) in [-1, 1] <-> z (B, C, H / f, W / f); H and W multiples of image_size."""

    def __init__(self, config: SpatialVAEConfig) -> None:
        super().__init__()
        self.config = config
        n = len(config.block_out_channels)
        self.ae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=config.image_size,
            mid_block_add_attention=False,  # 7x7 needs no self-attention; keeps the toy small
        )
        # 1 / std of the latents, set by the training module from held-out digits (latent_scale_factor).
        self.register_buffer("scale_factor", torch.ones(()))

    def _halves(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = self.config.image_size
        if x.shape[-2] != s or x.shape[-1] % s:
            raise ValueError(f"images must be {s} high and a multiple of {s} wide (digits side by side), got {tuple(x.shape[-2:])}")
        return list(x.split(s, dim=-1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, s, k*s) -> mu, logvar, each (B, C, s/f, k*s/f): each s x s digit encoded on its own."""
        dists = [self.ae.encode(h).latent_dist for h in self._halves(x)]
        # diffusers clamps logvar to [-30, 20], as LDM's DiagonalGaussianDistribution does
        return torch.cat([d.mean for d in dists], dim=-1), torch.cat([d.logvar for d in dists], dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, s/f, k*s/f) -> x (B, 1, s, k*s), unbounded (the training target is in [-1, 1])."""
        zs = z.split(self.config.latent_size, dim=-1)
        return torch.cat([self.ae.decode(h).sample for h in zs], dim=-1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x -> (reconstruction, mu, logvar) with one z ~ q(z|x) (the reparameterisation trick)."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar, generator)), mu, logvar

    def loss_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon, kl), scalars: the squared error per pixel of one sampled reconstruction (a Gaussian
        decoder up to constants) and the KL per latent element, both means over the batch."""
        recon, mu, logvar = self(x, generator)
        return F.mse_loss(recon, x), gaussian_kl(mu, logvar).mean()

    # The two maps latent diffusion uses: pixels -> unit-scale latents and back.
    def to_latent(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (B, 1, s, k*s) -> scale_factor * z with z ~ q(z|x) (what LDM's and diffusers' training
        scripts feed the diffusion model), or the posterior mean with sample=False."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator) if sample else mu
        return z * self.scale_factor

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of to_latent: decode z / scale_factor, clamped to the data range [-1, 1]."""
        return self.decode(z / self.scale_factor).clamp(-1.0, 1.0)


def latent_scale_factor(z: torch.Tensor) -> float:
    """1 / std(z) over every element of a batch of latents (LDM's `scale_factor`, computed as
    1 / z.flatten().std() on a first batch in their code, here on held-out digits)."""
    if z.numel() < 2:
        raise ValueError("need at least two latent elements to estimate their std")
    return float(1.0 / z.float().flatten().std())
