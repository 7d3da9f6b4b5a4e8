"""SpatialVAEModule: trains the latent-diffusion autoencoder (modules/ldm/autoencoder.py) on single digits.

    practicum run configs/ldm/vae_mnist5k.yaml      # writes checkpoints/ldm/vae_mnist5k.ckpt (export_path)
(`practicum study configs/studies/conditioning.yaml` trains it as the `vae` stage and hands its
checkpoint to the latent variant.)

Logged:
    {train,val,test}/recon   squared error per pixel of a sampled reconstruction, images in [-1, 1]
    {train,val,test}/kl      KL(q(z|x) || N(0, I)) per latent element
    {train,val,test}/loss    recon + kl_weight * kl, the objective
    {val,test}/recon_mean    squared error per pixel of decode(mu), the deterministic round trip
    vae/scale_factor         1 / std of the held-out digits' latents (LDM's scale factor), also
                             stored in the checkpoint (the VAE's `scale_factor` buffer)
    vae/latent_std           std of those latents before scaling
Artifact: samples/reconstructions.png (held-out digits above their round trips).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from modules.artifacts import image_grid, log_image
from modules.ldm.autoencoder import SpatialVAE, SpatialVAEConfig, latent_scale_factor


class SpatialVAEModule(L.LightningModule):
    """KL-regularised conv VAE on (images (B, 1, 28, 28) in [-1, 1], labels) batches (MNISTDataModule).

    Args:
        image_size: side of the training digits.
        block_out_channels: encoder widths per level; 3 levels give a 7 x 7 latent for 28 x 28.
        latent_channels: C of the latent.
        layers_per_block: ResNet blocks per level.
        kl_weight: weight of the KL term (LDM's KL-reg uses ~1e-6; larger blurs the reconstructions).
        lr: Adam learning rate.
        eval_seed: seed of the z drawn for the validation and test losses.
        export_path: also save the trained autoencoder here at the end of fit (a Lightning
            checkpoint a latent-diffusion config can name as its `vae_checkpoint`).
    """

    def __init__(
        self,
        image_size: int = 28,
        block_out_channels: tuple[int, ...] = (16, 32, 32),
        latent_channels: int = 4,
        layers_per_block: int = 1,
        kl_weight: float = 1e-4,
        lr: float = 1e-3,
        eval_seed: int = 0,
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.config = SpatialVAEConfig(image_size=image_size, block_out_channels=tuple(block_out_channels),
                                       latent_channels=latent_channels, layers_per_block=layers_per_block)
        self.net = SpatialVAE(self.config)
        self._latents: list[torch.Tensor] = []
        self._shown: torch.Tensor | None = None

    def _step(self, x: torch.Tensor, split: str, generator: torch.Generator | None = None) -> torch.Tensor:
        recon, kl = self.net.loss_terms(x, generator)
        loss = recon + self.hparams.kl_weight * kl
        on_step = split == "train"
        self.log_dict({f"{split}/loss": loss, f"{split}/recon": recon, f"{split}/kl": kl},
                      on_step=on_step, on_epoch=not on_step, prog_bar=on_step)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch[0], "train")

    def _eval_step(self, batch, batch_idx: int, split: str) -> None:
        x = batch[0]
        g = torch.Generator(device=x.device).manual_seed(self.hparams.eval_seed + batch_idx)
        self._step(x, split, g)
        mu, logvar = self.net.encode(x)
        self.log(f"{split}/recon_mean", F.mse_loss(self.net.decode(mu), x), on_epoch=True)
        # the latents the diffusion model will see: z ~ q(z|x), unscaled
        self._latents.append((mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g, device=mu.device)).cpu())
        if batch_idx == 0:
            self._shown = torch.cat([x[:10], self.net.decode(mu[:10]).clamp(-1, 1)]).cpu()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        # The scale factor is set at every validation, before the checkpoint callback saves the
        # weights, so every saved checkpoint carries the factor of its own weights.
        if self._latents:
            z = torch.cat(self._latents)
            self._latents = []
            self.net.scale_factor.fill_(latent_scale_factor(z))
            self.log_dict({"vae/scale_factor": float(self.net.scale_factor), "vae/latent_std": float(z.std())})
        if self._shown is not None and not self.trainer.sanity_checking:
            log_image(self.loggers, image_grid(self._shown, nrow=10), "samples/reconstructions.png")

    def on_test_epoch_end(self) -> None:
        self._latents = []

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            path = Path(os.path.expanduser(self.hparams.export_path))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.trainer.save_checkpoint(path, weights_only=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def load_autoencoder(path: str) -> SpatialVAE:
    """The SpatialVAE of a SpatialVAEModule checkpoint (a stage's or `export_path`), in eval mode, frozen."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise FileNotFoundError(
            f"vae_checkpoint {path!r} does not exist: train the autoencoder first "
            "(practicum run configs/ldm/vae_mnist5k.yaml writes checkpoints/ldm/vae_mnist5k.ckpt) "
            "or point vae_checkpoint at another SpatialVAEModule checkpoint"
        )
    module = SpatialVAEModule.load_from_checkpoint(p, map_location="cpu", weights_only=True)
    if float(module.net.scale_factor) == 1.0:
        raise ValueError(f"{path} holds no latent scale factor (it is still 1): it was saved before any validation; "
                         "train with validation (trainer.limit_val_batches > 0)")
    net = module.net.eval()
    net.requires_grad_(False)
    return net
