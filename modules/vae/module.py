"""VAEModule: trains the VAE on the negative ELBO and is judged like the DDPM, by the LeNet.

The judge is a run of its own, as for the DDPM (`modules/diffusion/module.py`):
    practicum run configs/classifier/lenet_mnist5k.yaml   # writes checkpoints/classifier/lenet_mnist5k.ckpt
    practicum run configs/vae/vae_mnist5k.yaml
(`practicum study configs/studies/vae-vs-ddpm.yaml` trains it as a stage.) Without a
`classifier_checkpoint` the FID/coverage/confidence metrics are skipped with a warning.

Logged, all in nats per image (a sum over the 784 pixels, a mean over images):
    {train,val,test}/loss   the negative ELBO, recon + KL, at beta = 1 (what the reference numbers
                            quote); train/objective is what is minimised, recon + beta * KL
    {train,val,test}/recon  -log p(x|z) at one z ~ q(z|x) (the summed BCE for the Bernoulli)
    {train,val,test}/kl     KL(q(z|x) || N(0, I)), in closed form
    {val,test}/fid, fid_floor, class_coverage, classifier_confidence   the judge's verdict on
                            num_eval_samples prior samples (`modules.classifier.judge`)
Artifacts: samples/final.png (prior samples), samples/reconstructions.png, samples/traversal.png.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from modules.artifacts import image_grid, log_image
from modules.classifier.judge import judge_samples
from modules.classifier.model import LeNet
from modules.classifier.module import attach_judge
from modules.vae.model import VAE, Likelihood, VAEConfig, decoder_mean, gaussian_kl


class VAEModule(L.LightningModule):
    """Kingma & Welling's VAE on 1-channel images in [-1, 1] (MNISTDataModule), modelled in [0, 1].

    Args:
        image_size: side of the square images (28 for MNIST).
        hidden_dims: encoder widths (the decoder mirrors them); (400,) is the reference MLP.
        latent_dim: D, the size of z.
        likelihood: "bernoulli" (BCE, the reference's) or "continuous_bernoulli"; see modules/vae/model.py.
        beta: weight of the KL term in the training objective (beta-VAE, Higgins et al. 2017); 1 is the ELBO.
        lr: Adam learning rate (1e-3 in the reference).
        num_eval_samples: prior samples judged at each validation and at test.
        eval_batch_size: samples decoded per batch.
        classifier_checkpoint: ClassifierModule checkpoint of the judge; None skips the judged metrics.
        eval_seed: seed of the evaluation noise (the z of val/test losses and the prior samples).
        traversal_steps: values per latent dimension in samples/traversal.png.
        traversal_dims: latent dimensions shown there (the most used ones, by KL), for latent_dim > 2.
    """

    def __init__(
        self,
        image_size: int = 28,
        hidden_dims: tuple[int, ...] = (400,),
        latent_dim: int = 20,
        likelihood: Likelihood = "bernoulli",
        beta: float = 1.0,
        lr: float = 1e-3,
        num_eval_samples: int = 1000,
        eval_batch_size: int = 500,
        classifier_checkpoint: str | None = None,
        eval_seed: int = 0,
        traversal_steps: int = 11,
        traversal_dims: int = 10,
    ) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (1 is the plain ELBO), got {beta}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if num_eval_samples < 0 or eval_batch_size < 1:
            raise ValueError(f"need num_eval_samples >= 0 and eval_batch_size >= 1, got {num_eval_samples}, {eval_batch_size}")
        if traversal_steps < 2 or traversal_dims < 1:
            raise ValueError(f"need traversal_steps >= 2 and traversal_dims >= 1, got {traversal_steps}, {traversal_dims}")
        self.save_hyperparameters()
        self.config = VAEConfig(image_size=image_size, hidden_dims=tuple(hidden_dims), latent_dim=latent_dim,
                                likelihood=likelihood)
        self.net = VAE(self.config)
        # Kept out of the module tree (a plain dict), so the judge's weights are not part of this checkpoint.
        self._judge: dict[str, LeNet] = {}
        self._real: dict[str, list[torch.Tensor]] = {"val": [], "test": []}  # held-out digits: the FID reference
        self._train_real: list[torch.Tensor] = []  # training digits: the real-vs-real floor
        self._fid_floor: dict[str, float] = {}
        self._last_val_real: torch.Tensor | None = None  # for the reconstructions and the traversal's choice of dims

    def setup(self, stage: str) -> None:
        attach_judge(self._judge, self.hparams.classifier_checkpoint, "VAEModule", stage)

    @property
    def judge(self) -> LeNet | None:
        return self._judge.get("lenet")

    # ------------------------------------------------------------------------------------ the ELBO
    def _to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """MNISTDataModule's [-1, 1] images -> the [0, 1] intensities the likelihood is defined on."""
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            raise ValueError(f"images are {tuple(x.shape[-2:])} but image_size={self.config.image_size}: set "
                             "model.init_args.image_size to match the data (28, or 32 with pad_to_32)")
        return ((x + 1) / 2).clamp(0, 1)

    def _terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        recon, kl = self.net.elbo_terms(self._to_unit(x), generator)
        recon, kl = recon.mean(), kl.mean()  # nats per image
        return {"loss": recon + kl, "objective": recon + self.hparams.beta * kl, "recon": recon, "kl": kl}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        t = self._terms(x)
        self.log("train/loss", t["loss"], on_step=True, prog_bar=True)
        self.log_dict({"train/objective": t["objective"], "train/recon": t["recon"], "train/kl": t["kl"]}, on_step=True)
        if sum(len(r) for r in self._train_real) < self.hparams.num_eval_samples:
            self._train_real.append(x.detach().cpu())
        return t["objective"]

    def _eval_step(self, batch, batch_idx: int, split: str) -> None:
        # The z of each batch is drawn from a fixed seed, so the value moves only when the model does.
        x, _ = batch
        g = torch.Generator(device=x.device).manual_seed(self.hparams.eval_seed + batch_idx)
        t = self._terms(x, g)
        self.log_dict({f"{split}/{k}": t[k] for k in ("loss", "recon", "kl")}, on_epoch=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")
        if not self.trainer.sanity_checking:
            self._real["val"].append(batch[0].detach().cpu())

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")
        self._real["test"].append(batch[0].detach().cpu())

    # ------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def decode_images(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) -> E[x|z] as images (N, 1, H, W) in [-1, 1], the data's scale (what the judge reads)."""
        return decoder_mean(self.net.decode(z.to(self.device)), self.config.likelihood) * 2 - 1

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n digits from the prior, z ~ N(0, I) -> E[x|z], (n, 1, H, W) in [-1, 1]. The mean, not a
        Bernoulli draw of every pixel: the pixels are independent given z, so a draw is the mean plus salt noise."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        z = torch.randn(n, self.config.latent_dim, device=self.device, generator=g)
        return torch.cat([self.decode_images(c) for c in z.split(self.hparams.eval_batch_size)])

    def noise_seed(self, split: str) -> int:
        """eval_seed for validation, one derived from it for test (as the DDPM does), so test judges fresh samples."""
        if split == "val":
            return self.hparams.eval_seed
        return int(np.random.SeedSequence([self.hparams.eval_seed, 1]).generate_state(1)[0])

    @torch.no_grad()
    def traversal(self, steps: int | None = None, dims: int | None = None, x: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The latent-space traversal as (images (rows * steps, 1, H, W) in [-1, 1], steps per row).

        latent_dim = 2: the learned manifold (Kingma & Welling, Fig. 4): z on a steps x steps grid of
        N(0, 1) quantiles 0.05..0.95. Otherwise one row per latent dimension, that dimension swept over
        the same quantiles with the others at 0 (the prior mean); the rows are the `dims` dimensions
        with the largest mean KL on `x` (the units the model uses: an unused one has KL ~ 0 and
        decodes to the same digit along its row), or the first `dims` without `x`.
        """
        steps = steps or self.hparams.traversal_steps
        dims = dims or self.hparams.traversal_dims
        d = self.config.latent_dim
        q = torch.linspace(0.05, 0.95, steps)
        values = math.sqrt(2) * torch.erfinv(2 * q - 1)  # N(0, 1) quantiles
        if d == 2:
            zy, zx = torch.meshgrid(values.flip(0), values, indexing="ij")
            z = torch.stack([zx, zy], -1).view(-1, 2)
            return self.decode_images(z), steps
        order = torch.arange(d)
        if x is not None:
            mu, logvar = self.net.encode(self._to_unit(x.to(self.device)))
            order = gaussian_kl(mu, logvar).mean(0).argsort(descending=True).cpu()
        rows = order[: min(dims, d)]
        z = torch.zeros(len(rows), steps, d)
        z[torch.arange(len(rows)), :, rows] = values
        return self.decode_images(z.view(-1, d)), steps

    # ------------------------------------------------------------------------------------ evaluation
    def _sample_and_judge(self, split: str) -> None:
        """Judge num_eval_samples prior samples against `split`'s digits seen by this epoch's steps,
        with the DDPM's judge, floor and sample count (`judge_samples`)."""
        real = torch.cat(self._real[split]) if self._real[split] else None
        self._real[split] = []
        if split == "val":
            self._last_val_real = real
        n = self.hparams.num_eval_samples
        if self.judge is None or real is None or n < 2 or len(real) < 2:
            return
        fake = self.sample(n, seed=self.noise_seed(split))
        # the floor: FID of n training digits against the same reference, computed once per split
        reference = torch.cat(self._train_real)[:n] if split not in self._fid_floor and self._train_real else None
        metrics = judge_samples(self.judge, fake, real, reference, split=split, device=self.device)
        if reference is not None:
            self._fid_floor[split] = metrics[f"{split}/fid_floor"]
        if split in self._fid_floor:
            metrics[f"{split}/fid_floor"] = self._fid_floor[split]
        self.log_dict(metrics, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._sample_and_judge("val")

    def on_test_epoch_end(self) -> None:
        self._sample_and_judge("test")

    def on_train_end(self) -> None:
        """The artifacts: 100 prior samples, reconstructions of validation digits, the traversal."""
        if not self.trainer.is_global_zero:
            return
        was_training = self.training
        self.eval()
        log_image(self.loggers, image_grid(self.sample(100, seed=self.hparams.eval_seed), nrow=10), "samples/final.png")
        rows = min(len(self._last_val_real), 50) // 10 if self._last_val_real is not None else 0
        if rows:
            x = self._last_val_real[: rows * 10].to(self.device)
            with torch.no_grad():
                mu, _ = self.net.encode(self._to_unit(x))
            # pairs of rows: 10 digits, then their reconstructions from the posterior mean
            shape = (rows, 10, *x.shape[1:])
            pairs = torch.stack([x.view(shape), self.decode_images(mu).view(shape)], 1)  # (rows, 2, 10, 1, H, W)
            log_image(self.loggers, image_grid(pairs.flatten(0, 2), nrow=10), "samples/reconstructions.png")
        grid, nrow = self.traversal(x=self._last_val_real)
        log_image(self.loggers, image_grid(grid, nrow=nrow), "samples/traversal.png")
        self.train(was_training)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
