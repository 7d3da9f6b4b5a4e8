"""The latent-diffusion autoencoder: shapes, the KL against diffusers' posterior, the scale factor, the round trip."""

import pytest
import torch
import torch.nn.functional as F

from datamodules.mnist import MNISTDataModule
from modules.ldm.autoencoder import SpatialVAE, SpatialVAEConfig, latent_scale_factor
from modules.ldm.autoencoder_module import load_autoencoder


def test_canvas_is_encoded_digit_by_digit_into_a_spatial_latent():
    torch.manual_seed(0)
    vae = SpatialVAE(SpatialVAEConfig(block_out_channels=(8, 8, 8))).eval()
    left, right = torch.rand(3, 1, 28, 28) * 2 - 1, torch.rand(3, 1, 28, 28) * 2 - 1
    mu, logvar = vae.encode(torch.cat([left, right], dim=-1))
    assert mu.shape == logvar.shape == (3, 4, 7, 14)  # 4 x 7 x 7 per digit, side by side
    torch.testing.assert_close(mu[..., 7:], vae.encode(right)[0])  # the right digit's latent is its own
    assert vae.decode(mu).shape == (3, 1, 28, 56)
    with pytest.raises(ValueError, match="multiple of 28 wide"):
        vae.encode(torch.zeros(1, 1, 28, 30))


def test_kl_term_matches_diffusers_posterior():
    """gaussian_kl (modules/vae) per latent element, summed, is diffusers' DiagonalGaussianDistribution.kl()."""
    torch.manual_seed(0)
    vae = SpatialVAE(SpatialVAEConfig(block_out_channels=(8, 8, 8)))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    recon, kl = vae.loss_terms(x, torch.Generator().manual_seed(0))
    reference = vae.ae.encode(x).latent_dist.kl()  # (B,), summed over C, h, w
    torch.testing.assert_close(kl * 4 * 7 * 7, reference.mean(), rtol=1e-5, atol=1e-6)
    assert recon > 0


def test_scale_factor_makes_latents_unit_variance():
    z = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3.0 + 1.0
    assert latent_scale_factor(z) == pytest.approx(1 / 3, rel=0.02)
    assert (z * latent_scale_factor(z)).std().item() == pytest.approx(1.0, rel=1e-4)


def test_config_rejects_a_latent_that_does_not_tile_the_digit():
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
        SpatialVAEConfig(block_out_channels=(8, 8, 8, 8))


def test_latent_round_trip_of_a_trained_autoencoder(tiny_vae_ckpt):
    """Encode then decode held-out digits with the tiny trained VAE (60 steps on 512 digits): the
    squared error per pixel (images in [-1, 1]) is below 0.12 and below half that of the best constant
    image (the mean training digit, ~0.26); an untrained one is near 1. The scale factor travels in the
    checkpoint and to_latent / from_latent undo each other."""
    vae = load_autoencoder(tiny_vae_ckpt)
    dm = MNISTDataModule(train_limit=512)
    dm.setup()
    x = dm._tensors("test").tensors[0][:200]
    mean_image = dm._tensors("train").tensors[0].mean(0, keepdim=True).expand_as(x)
    with torch.no_grad():
        mu, _ = vae.encode(x)
        err = F.mse_loss(vae.decode(mu), x).item()
        assert err < 0.12 and err < 0.5 * F.mse_loss(mean_image, x).item()
        assert float(vae.scale_factor) != 1.0
        z = vae.to_latent(x, sample=False)
        assert z.std().item() == pytest.approx(1.0, abs=0.3)  # the factor came from other held-out digits
        torch.testing.assert_close(vae.from_latent(z), vae.decode(mu).clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_missing_autoencoder_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/ldm/vae_mnist5k.yaml"):
        load_autoencoder(str(tmp_path / "nope.ckpt"))
