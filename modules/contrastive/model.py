"""Representation learning on digits: one small CNN encoder, trained by different objectives.

Only torch (and the VAE project's ELBO maths) is imported here; `module.py` trains and probes.
Every objective uses the same `ConvEncoder`, so a linear probe on its features compares the
objectives, not the architectures:

- "simclr": two augmented views, a projection head, NT-Xent (`loss.py`, Chen et al. 2020);
- "autoencoder": a conv decoder reconstructs the image, mean squared error;
- "vae": the encoder's features give (mu, logvar), the decoder a Bernoulli likelihood, the negative
  ELBO of `modules.vae.model` (Kingma & Welling 2014); the probe reads mu, the VAE's mean;
- "supervised": a linear classifier on the features, cross-entropy on the labels (the upper line);
- "random": the encoder at its initialisation, never trained (the floor).

Shape legend: B batch, images (B, 1, 28, 28) in [-1, 1], F feature_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.vae.model import gaussian_kl, log_likelihood, reparameterize

OBJECTIVES = ("simclr", "autoencoder", "vae", "supervised", "random")


@dataclass
class RepresentationConfig:
    """Args:
        objective: one of OBJECTIVES (see the module docstring).
        feature_dim: width F of the features the probe reads (for "vae": the latent dimension).
        width: channels of the first conv layer (then 2x, 4x).
        proj_dim: output width of SimCLR's projection head (an MLP F -> F -> proj_dim).
        num_classes: labels of the supervised head.
    """

    objective: str = "simclr"
    feature_dim: int = 64
    width: int = 16
    proj_dim: int = 32
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("feature_dim", "width", "proj_dim", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class ConvEncoder(nn.Module):
    """28x28 -> 14 -> 7 -> 4 by stride-2 3x3 convs, then a linear map to F features."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(1, w, 3, 2, 1), nn.ReLU(),  # (B, w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.ReLU(),  # (B, 2w, 7, 7)
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.ReLU(),  # (B, 4w, 4, 4)
        )
        self.fc = nn.Linear(4 * w * 16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x).flatten(1))


class ConvDecoder(nn.Module):
    """F -> (4w, 4, 4) -> 7 -> 14 -> 28: the encoder mirrored; returns (B, 1, 28, 28) pre-activations."""

    def __init__(self, width: int, in_dim: int):
        super().__init__()
        self.w = width
        self.fc = nn.Linear(in_dim, 4 * width * 16)
        self.deconvs = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(4 * width, 2 * width, 3, 2, 1),  # (B, 2w, 7, 7)
            nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 3, 2, 1, output_padding=1),  # (B, w, 14, 14)
            nn.ReLU(), nn.ConvTranspose2d(width, 1, 3, 2, 1, output_padding=1),  # (B, 1, 28, 28)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.deconvs(self.fc(h).view(-1, 4 * self.w, 4, 4))


class RepresentationModel(nn.Module):
    """The encoder and what its objective needs on top of it (head, decoder, classifier)."""

    def __init__(self, config: RepresentationConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = ConvEncoder(c.width, 2 * c.feature_dim if c.objective == "vae" else c.feature_dim)
        if c.objective == "simclr":  # SimCLR's g(.): a 2-layer MLP; the probe reads h before it
            self.head = nn.Sequential(nn.Linear(c.feature_dim, c.feature_dim), nn.ReLU(), nn.Linear(c.feature_dim, c.proj_dim))
        if c.objective in ("autoencoder", "vae"):
            self.decoder = ConvDecoder(c.width, c.feature_dim)
        if c.objective == "supervised":
            self.classifier = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F): what the linear probe reads (the VAE: mu)."""
        h = self.encoder(x)
        return h[:, : self.config.feature_dim] if self.config.objective == "vae" else h

    def vae_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per image (nats), Bernoulli likelihood of the pixels mapped to [0, 1]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        logits = self.decoder(reparameterize(mu, logvar))
        recon = -log_likelihood(logits, (x + 1) / 2, "bernoulli")
        return (recon + gaussian_kl(mu, logvar).sum(1)).mean()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, max_degrees: float = 15.0,
            scale: tuple[float, float] = (0.85, 1.1), max_shift: float = 3.0, noise: float = 0.1) -> torch.Tensor:
    """A random view of each digit that keeps it the same digit: a small rotation (+-max_degrees),
    a zoom (random crop/resize), a shift of up to max_shift pixels, then Gaussian pixel noise.
    No flips and no large rotations: they turn a 6 into a 9. x (B, 1, H, W) in [-1, 1]."""
    b, device = x.size(0), x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=device) * (hi - lo) + lo

    angle = uniform(-max_degrees, max_degrees) * math.pi / 180
    s = uniform(*scale)
    shift = 2 * max_shift / x.size(-1)  # affine_grid works in [-1, 1] coordinates
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s  # output -> input map: rotate and zoom by 1/s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # background is -1: sample x + 1 with zero padding, then shift back
    out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    out = out + noise * torch.randn(out.shape, generator=generator, device=device)
    return out.clamp(-1, 1)
