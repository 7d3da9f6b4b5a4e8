"""The VAE core against torch.distributions and F.binary_cross_entropy: KL, log-likelihoods,
the reparameterised sample, the ELBO, shapes and parameter counts."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal, kl_divergence

from modules.vae.model import (
    VAE,
    VAEConfig,
    bernoulli_log_prob,
    continuous_bernoulli_log_norm,
    decoder_mean,
    gaussian_kl,
    log_likelihood,
    reparameterize,
)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(64, 20, generator=g) * 2, torch.randn(64, 20, generator=g) * 2
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)) == 0)  # q = p: no divergence


def test_bernoulli_log_prob_matches_bce_and_torch_bernoulli():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 784, generator=g) * 4
    x = torch.rand(8, 784, generator=g)  # grey MNIST intensities, not only 0/1
    x[:, :100] = (x[:, :100] > 0.5).float()
    ll = bernoulli_log_prob(logits, x)
    # in float64: in float32 sigmoid(16) rounds to 1 and F.binary_cross_entropy clamps log(0) to -100
    bce = F.binary_cross_entropy(torch.sigmoid(logits.double()), x.double(), reduction="none")
    torch.testing.assert_close(ll.double(), -bce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ll, Bernoulli(logits=logits, validate_args=False).log_prob(x), atol=1e-5, rtol=1e-5)
    # summed per image: the reference's "BCE summed per image"
    torch.testing.assert_close(log_likelihood(logits.view(8, 1, 28, 28), x.view(8, 1, 28, 28), "bernoulli"),
                               -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1), atol=1e-3, rtol=1e-5)
    # saturated logits stay finite where log(sigmoid) would give -inf
    assert torch.isfinite(bernoulli_log_prob(torch.tensor([200.0, -200.0]), torch.tensor([0.0, 1.0]))).all()


def test_continuous_bernoulli_matches_torch_including_near_zero_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(2000, generator=g) * 6, torch.randn(200, generator=g) * 1e-3, torch.tensor([0.0, 1e-2, -1e-2, 30.0])])
    x = torch.rand(logits.shape, generator=g)
    ref = ContinuousBernoulli(logits=logits.double(), validate_args=False).log_prob(x.double())
    got = log_likelihood(logits.view(1, -1), x.view(1, -1), "continuous_bernoulli")
    torch.testing.assert_close(got.double(), ref.sum().view(1), atol=2e-2, rtol=1e-5)  # summed over 2,204 values
    per = bernoulli_log_prob(logits.double(), x.double()) + continuous_bernoulli_log_norm(logits.double())
    torch.testing.assert_close(per, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(continuous_bernoulli_log_norm(torch.zeros(1)), torch.log(torch.tensor([2.0])))  # C(0.5) = 2
    # the gradient is finite at and around eta = 0, where the closed form is 0/0
    eta = torch.tensor([0.0, 1e-4, -5e-3, 3.0], requires_grad=True)
    continuous_bernoulli_log_norm(eta).sum().backward()
    assert torch.isfinite(eta.grad).all()
    # its mean is not lambda (the Bernoulli's): it is torch's mean, pulled towards 1/2
    m = decoder_mean(torch.tensor([2.0]), "continuous_bernoulli")
    torch.testing.assert_close(m, ContinuousBernoulli(logits=torch.tensor([2.0])).mean)
    assert 0.5 < m.item() < torch.sigmoid(torch.tensor(2.0)).item()


def test_reparameterised_sample_has_the_posterior_moments_and_gradients():
    mu = torch.tensor([[-1.0, 0.5, 3.0]]).expand(200_000, 3).clone().requires_grad_(True)
    logvar = torch.tensor([[0.0, -2.0, 1.0]]).expand(200_000, 3).clone().requires_grad_(True)
    z = reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), mu[0].detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(z.var(0), logvar[0].detach().exp(), atol=0.02, rtol=0.01)
    z.sum().backward()  # dz/dmu = 1, dz/dlogvar = eps sigma / 2: the gradient flows through the sample
    assert torch.all(mu.grad == 1)
    eps = (z.detach() - mu.detach()) / (0.5 * logvar.detach()).exp()
    torch.testing.assert_close(logvar.grad, 0.5 * eps * (0.5 * logvar.detach()).exp())


def test_reference_architecture_and_shapes():
    net = VAE(VAEConfig())  # 784-400-20, pytorch/examples' fc1, fc21, fc22, fc3, fc4
    n = lambda a, b: a * b + b  # noqa: E731
    assert sum(p.numel() for p in net.parameters()) == n(784, 400) + 2 * n(400, 20) + n(20, 400) + n(400, 784)
    x = torch.rand(5, 1, 28, 28)
    logits, mu, logvar = net(x)
    assert logits.shape == (5, 1, 28, 28) and mu.shape == logvar.shape == (5, 20)
    deep = VAE(VAEConfig(hidden_dims=(256, 64), latent_dim=2))
    assert deep.decode(torch.zeros(3, 2)).shape == (3, 1, 28, 28)
    assert [m.out_features for m in deep.decoder if isinstance(m, torch.nn.Linear)] == [64, 256, 784]


def test_elbo_terms_are_the_summed_bce_and_the_closed_form_kl():
    torch.manual_seed(0)
    net = VAE(VAEConfig(latent_dim=4))
    x = torch.rand(6, 1, 28, 28)
    recon, kl = net.elbo_terms(x, torch.Generator().manual_seed(3))
    # the same z by hand, from the same generator
    mu, logvar = net.encode(x)
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    bce = F.binary_cross_entropy(torch.sigmoid(net.decode(z)), x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(recon, bce, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(kl, kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1))
    assert torch.all(recon > 0) and torch.all(kl >= 0)  # -log p of grey pixels, and a divergence


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="likelihood must be"):
        VAEConfig(likelihood="gaussian")
    with pytest.raises(ValueError, match="latent_dim"):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="hidden_dims"):
        VAEConfig(hidden_dims=(400, 0))
