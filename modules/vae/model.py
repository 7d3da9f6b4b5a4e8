"""The variational autoencoder of Kingma & Welling (2014), "Auto-Encoding Variational Bayes".

An MLP encoder gives q(z|x) = N(mu, diag(exp(logvar))); z = mu + sigma * eps (the
reparameterisation trick, Sec. 2.4); an MLP decoder gives the logits eta of p(x|z); the loss is
the negative ELBO, -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)) (eq. 10), in nats per image.

The decoder likelihood is a choice (`VAEConfig.likelihood`):
- "bernoulli" (the default): log p(x|z) = sum_i x_i eta_i - softplus(eta_i), i.e. minus the BCE
  summed over pixels. It is what Kingma & Welling, pytorch/examples and flax use on grey MNIST
  intensities x in [0, 1], so its losses are comparable with theirs (~104-106 nats on full MNIST
  after 10 epochs); for x strictly inside (0, 1) it is not a normalised density, a known flaw.
- "continuous_bernoulli" (Loaiza-Ganem & Cunningham, 2019): the same times the normaliser C(eta)
  that makes it a density on [0, 1]. Its log-likelihoods are not on the Bernoulli's scale (they
  can be positive), so they are not compared with the reference numbers.

Pure PyTorch: no Lightning. The math (reparameterize, gaussian_kl, the two log-likelihoods) are
plain functions, each tested against torch.distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Likelihood = Literal["bernoulli", "continuous_bernoulli"]


@dataclass
class VAEConfig:
    """784-400-20 is the reference setting of pytorch/examples and flax (one hidden layer of 400)."""

    image_size: int = 28
    hidden_dims: tuple[int, ...] = (400,)
    latent_dim: int = 20
    likelihood: Likelihood = "bernoulli"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive widths, got {self.hidden_dims}")
        if self.likelihood not in ("bernoulli", "continuous_bernoulli"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'continuous_bernoulli', got {self.likelihood!r}")

    @property
    def input_dim(self) -> int:
        return self.image_size * self.image_size


# ---------------------------------------------------------------------------------------------- math
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): a sample of N(mu, exp(logvar)) that is a
    differentiable function of (mu, logvar), so the ELBO's expectation has a low-variance gradient."""
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per latent dimension, (B, D) -> (B, D), in closed form
    (Kingma & Welling, Appendix B): -1/2 (1 + logvar - mu^2 - exp(logvar)). Sum over D for the ELBO."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | eta) = x log sigmoid(eta) + (1 - x) log(1 - sigmoid(eta)) = x eta - softplus(eta),
    elementwise; written with softplus so large |eta| does not take the log of 0."""
    return x * logits - F.softplus(logits)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(eta), the continuous Bernoulli's log normaliser, elementwise.

    With lambda = sigmoid(eta), C = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) = eta / tanh(eta / 2),
    since 1 - 2 lambda = -tanh(eta / 2). Computed as log|eta| - log tanh(|eta| / 2), with
    log tanh(u / 2) = log1p(-e^-u) - log1p(e^-u); near eta = 0 (where both terms blow up) by the
    series eta / tanh(eta / 2) = 2 (1 + eta^2 / 12 - eta^4 / 720 + ...).
    """
    a = logits.abs()
    small = a < 1e-2
    a_safe = torch.where(small, torch.ones_like(a), a)  # keeps the unused branch finite (and its gradient)
    far = a_safe.log() - torch.log1p(-torch.exp(-a_safe)) + torch.log1p(torch.exp(-a_safe))
    e2 = logits.pow(2)
    near = math.log(2.0) + torch.log1p(e2 / 12 - e2.pow(2) / 720)
    return torch.where(small, near, far)


def log_likelihood(logits: torch.Tensor, x: torch.Tensor, likelihood: Likelihood) -> torch.Tensor:
    """log p(x | z) summed over pixels: logits and x (B, ...) -> (B,); x in [0, 1]."""
    ll = bernoulli_log_prob(logits, x)
    if likelihood == "continuous_bernoulli":
        ll = ll + continuous_bernoulli_log_norm(logits)
    return ll.flatten(1).sum(1)


def decoder_mean(logits: torch.Tensor, likelihood: Likelihood) -> torch.Tensor:
    """E[x | z] in [0, 1], the image a sample is shown as: sigmoid(eta) for the Bernoulli; for the
    continuous Bernoulli lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda)) (its mean, which is
    not lambda), through torch.distributions."""
    if likelihood == "bernoulli":
        return torch.sigmoid(logits)
    return torch.distributions.ContinuousBernoulli(logits=logits, validate_args=False).mean


# ---------------------------------------------------------------------------------------------- model
def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """encoder x (B, 784) -> h -> (mu, logvar) (B, D) each; decoder z (B, D) -> logits (B, 784).

    With the reference sizes (784-400-20) this is pytorch/examples' VAE: fc1, fc21/fc22, fc3, fc4.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        hidden = list(config.hidden_dims)
        self.encoder = nn.Sequential(mlp([config.input_dim, *hidden]), nn.ReLU())
        self.fc_mu = nn.Linear(hidden[-1], config.latent_dim)
        self.fc_logvar = nn.Linear(hidden[-1], config.latent_dim)
        self.decoder = mlp([config.latent_dim, *reversed(hidden), config.input_dim])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, H, W) or (B, H*W) in [0, 1] -> mu, logvar (B, D)."""
        h = self.encoder(x.flatten(1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> logits of p(x|z), (B, 1, H, W)."""
        s = self.config.image_size
        return self.decoder(z).view(-1, 1, s, s)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x (B, 1, H, W) in [0, 1] -> (logits (B, 1, H, W), mu, logvar (B, D)), one z per image."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar, generator)), mu, logvar

    def elbo_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, kl), each (B,) in nats: -log p(x|z) at one z ~ q(z|x), and KL(q(z|x) || p(z)).
        The negative ELBO is their sum (eq. 10 with L = 1 sample)."""
        logits, mu, logvar = self(x, generator)
        recon = -log_likelihood(logits, x, self.config.likelihood)
        return recon, gaussian_kl(mu, logvar).sum(1)
