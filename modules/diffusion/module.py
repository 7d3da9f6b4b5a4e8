"""DiffusionModule: trains eps_theta with L_simple, samples with the EMA weights, and is judged by a LeNet.

Two-step recipe (the judge is its own run, never trained on the fly):
    practicum run configs/classifier/lenet_mnist5k.yaml    # writes checkpoints/classifier/lenet_mnist5k.ckpt
    practicum run configs/diffusion/ddpm_mnist_cpu.yaml    # classifier_checkpoint points at that file
Without a `classifier_checkpoint` (null) the FID/coverage/confidence metrics are skipped with a
warning, so quick studies and tests need no judge; a path that does not exist is an error.

The judged metrics are computed twice over: at validation against the validation digits (`val/...`,
what a study selects guidance and sampling steps on) and, in `trainer.test`, against the test digits
with fresh sampling noise (`test/...`, what it reports).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from contract import ImageSampler
from modules.artifacts import image_grid, log_figure, log_image, log_text
from modules.classifier.judge import judge_samples
from modules.classifier.model import LeNet
from modules.classifier.module import attach_judge
from modules.diffusion.model import Denoiser, DiffusionConfig
from modules.diffusion.schedule import NoiseSchedule, min_snr_weight
from modules.training import cosine_schedule


def ema_with_warmup(decay: float):
    """multi_avg_fn for AveragedModel: EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    Early weights are forgotten quickly, so a short CPU run's EMA is not dragged back to the random
    initialisation, while long runs reach the full `decay`.
    """

    def avg(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)  # ema = d * ema + (1 - d) * p

    return avg


class DiffusionModule(L.LightningModule, ImageSampler):
    """DDPM (Ho et al., 2020) on 1-channel images, class-conditional with classifier-free guidance.

    Args:
        schedule: beta schedule, "linear" or "cosine".
        num_timesteps: T.
        beta_start: first beta (linear schedule).
        beta_end: last beta (linear schedule).
        image_size: 28, or 32 with MNISTDataModule(pad_to_32=True).
        block_out_channels: UNet channels per resolution level.
        attention: self-attention per level (one bool per level).
        layers_per_block: ResNet blocks per level.
        num_classes: 0 for an unconditional model, else the number of labels.
        cond_drop_prob: probability of replacing a label by the null label in training (CFG).
        guidance_scale: w in eps_null + w (eps_y - eps_null) when sampling; 1 = conditional, 0 = unconditional.
        prediction: what the UNet outputs: "eps" (the noise, Ho et al.) or "v" (sqrt(abar) eps -
            sqrt(1 - abar) x_0, Salimans & Ho); samplers always receive eps.
        loss_weighting: "uniform" (L_simple on the prediction target) or "min_snr" (Hang et al.: each
            sample's MSE weighted by min(SNR, snr_gamma) on the x_0 scale, see `min_snr_weight`).
        snr_gamma: gamma of min-SNR weighting (the paper's 5).
        lr: AdamW learning rate (after a linear warmup).
        warmup_steps: learning-rate warmup steps.
        lr_schedule: after the warmup, "constant", or "cosine" decay to min_lr_ratio * lr at the
            trainer's last step (`modules.training.cosine_schedule`).
        min_lr_ratio: the cosine schedule's floor, as a fraction of lr.
        weight_decay: AdamW weight decay.
        ema_decay: final EMA decay of the sampling weights (with warmup, see `ema_with_warmup`).
        sampler: "ddim" or "dpm" (DPM-Solver++(2M), diffusers), num_sample_steps steps each, or
            "ddpm" (Algorithm 2, all T steps) for evaluation.
        num_sample_steps: DDIM / DPM-Solver steps at evaluation.
        eta: DDIM eta (0 deterministic).
        num_eval_samples: digits generated at each evaluation for FID, coverage and confidence.
        eval_batch_size: digits per sampling batch.
        classifier_checkpoint: ClassifierModule checkpoint of the judge; None skips the judged metrics.
        eval_seed: seed of the evaluation noise, fixed so that evaluations compare like with like.
        select_guidance: guidance scales to choose from before testing, by FID on the last
            validation's digits (with the validation noise); the test split is then judged once, at
            the chosen setting, so it never takes part in the choice. None: keep guidance_scale.
        select_sample_steps: likewise, DDIM step counts to choose from. None: keep num_sample_steps.
    """

    def __init__(
        self,
        schedule: Literal["linear", "cosine"] = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        image_size: int = 28,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        attention: tuple[bool, ...] = (False, False, True),
        layers_per_block: int = 1,
        num_classes: int = 10,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 2.0,
        prediction: Literal["eps", "v"] = "eps",
        loss_weighting: Literal["uniform", "min_snr"] = "uniform",
        snr_gamma: float = 5.0,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        sampler: Literal["ddim", "ddpm", "dpm"] = "ddim",
        num_sample_steps: int = 50,
        eta: float = 0.0,
        num_eval_samples: int = 1000,
        eval_batch_size: int = 500,
        classifier_checkpoint: str | None = None,
        eval_seed: int = 0,
        select_guidance: list[float] | None = None,
        select_sample_steps: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if cond_drop_prob == 0.0 and num_classes and guidance_scale != 1.0:
            raise ValueError("guidance_scale != 1 needs an unconditional model: set cond_drop_prob > 0 (e.g. 0.1)")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if num_eval_samples < 0 or eval_batch_size < 1:
            raise ValueError(f"need num_eval_samples >= 0 and eval_batch_size >= 1, got {num_eval_samples}, {eval_batch_size}")
        if sampler in ("ddim", "dpm") and not 1 <= num_sample_steps <= num_timesteps:
            raise ValueError(f"num_sample_steps must be in [1, num_timesteps={num_timesteps}], got {num_sample_steps}")
        if cond_drop_prob == 0.0 and num_classes and any(w != 1.0 for w in select_guidance or []):
            raise ValueError("select_guidance other than 1 needs an unconditional model: set cond_drop_prob > 0")
        if any(not 1 <= k <= num_timesteps for k in select_sample_steps or []):
            raise ValueError(f"select_sample_steps must lie in [1, num_timesteps={num_timesteps}], got {select_sample_steps}")
        if sampler not in ("ddim", "ddpm", "dpm"):
            raise ValueError(f"sampler must be 'ddim', 'dpm' or 'ddpm', got {sampler!r}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if loss_weighting not in ("uniform", "min_snr"):
            raise ValueError(f"loss_weighting must be 'uniform' or 'min_snr', got {loss_weighting!r}")
        if loss_weighting == "min_snr" and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (the paper uses 5), got {snr_gamma}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters()
        self.schedule = NoiseSchedule(num_timesteps, schedule, beta_start, beta_end)
        self.config = DiffusionConfig(
            image_size=image_size,
            block_out_channels=tuple(block_out_channels),
            attention=tuple(attention),
            layers_per_block=layers_per_block,
            num_classes=num_classes,
        )
        self.net = Denoiser(self.config)
        self.ema = AveragedModel(self.net, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        # Kept out of the module tree (a plain dict), so the judge's weights are not part of this
        # model's checkpoint and a checkpoint loads without the judge file.
        self._judge: dict[str, LeNet] = {}
        self._real: dict[str, list[torch.Tensor]] = {"val": [], "test": []}  # held-out digits: the FID reference
        self._train_real: list[torch.Tensor] = []  # training digits: the real-vs-real floor
        self._fid_floor: dict[str, float] = {}  # per split: its reference digits do not change between evaluations
        self._last_val_real: torch.Tensor | None = None  # the last validation's digits: what selection judges against
        self._losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        attach_judge(self._judge, self.hparams.classifier_checkpoint, "DiffusionModule", stage)

    @property
    def judge(self) -> LeNet | None:
        return self._judge.get("lenet")

    # ------------------------------------------------------------------------------------ training
    def _loss(self, x0: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The MSE on the prediction target at t ~ U{0..T-1}, eps ~ N(0, I); x0 (B, C, H, W).

        eps target, uniform weighting: L_simple (eq. 14). min_snr: each sample's MSE times its
        min-SNR weight (`min_snr_weight`), then the batch mean.
        """
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        xt = self.schedule.q_sample(x0, t, noise)
        target = noise if self.hparams.prediction == "eps" else self.schedule.v_target(x0, t, noise)
        per_sample = (self.net(xt, t, y) - target).pow(2).flatten(1).mean(1)  # (B,)
        if self.hparams.loss_weighting == "min_snr":
            per_sample = per_sample * min_snr_weight(self.schedule.snr(t), self.hparams.snr_gamma, self.hparams.prediction)
        return per_sample.mean()

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.config.num_classes else None

    def training_step(self, batch, batch_idx):
        x0, y = batch
        if x0.shape[-1] != self.config.image_size:
            raise ValueError(
                f"images are {x0.shape[-1]}x{x0.shape[-1]} but image_size={self.config.image_size}: "
                "set model.init_args.image_size to match data.init_args.pad_to_32 (28 or 32)"
            )
        y = self._labels(y)
        if y is not None and self.hparams.cond_drop_prob > 0:
            # Classifier-free guidance training: drop the label to the null label with prob p.
            drop = torch.rand(y.shape, device=y.device) < self.hparams.cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.net.null_label), y)
        loss = self._loss(x0, y)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self._losses.append(loss.detach())
        if sum(len(r) for r in self._train_real) < self.hparams.num_eval_samples:
            self._train_real.append(x0.detach().cpu())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.net)

    def _eval_loss(self, batch, batch_idx: int) -> torch.Tensor:
        # Fixed t and noise per batch, so the value moves only when the model does.
        x0, y = batch
        g = torch.Generator(device=x0.device).manual_seed(self.hparams.eval_seed + batch_idx)
        return self._loss(x0, self._labels(y), generator=g)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._eval_loss(batch, batch_idx), on_epoch=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self._real["val"].append(batch[0].detach().cpu())

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._eval_loss(batch, batch_idx), on_epoch=True, sync_dist=True)
        self._real["test"].append(batch[0].detach().cpu())

    # ------------------------------------------------------------------------------------ sampling
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @torch.no_grad()
    def sample(
        self, n: int, labels: torch.Tensor | None = None, seed: int = 0, keep: int = 0, use_ema: bool = True
    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """n digits (n, 1, H, W) in [-1, 1]; labels default to 0, 1, ..., 9, 0, ... for a conditional model.

        Returns the images and, with keep > 0, snapshots (t, x_t) of the first batch for a denoising strip.
        """
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        if labels is None and self.config.num_classes:
            labels = torch.arange(n, device=self.device) % self.config.num_classes
        g = torch.Generator(device=self.device).manual_seed(seed)
        size = self.config.image_size
        out, snaps = [], []
        for start in range(0, n, self.hparams.eval_batch_size):
            b = min(self.hparams.eval_batch_size, n - start)
            y = labels[start : start + b].to(self.device) if labels is not None else None

            def eps_fn(x, t, y=y):
                out = net.guided(x, t, y, self.hparams.guidance_scale)  # guidance is linear, so it mixes v as it mixes eps
                return out if self.hparams.prediction == "eps" else self.schedule.eps_from_v(x, t, out)

            x, s = self.schedule.sample(
                eps_fn, (b, 1, size, size), self.hparams.sampler, self.hparams.num_sample_steps, self.hparams.eta,
                generator=g, device=self.device, keep=keep if start == 0 else 0,
            )
            out.append(x.clamp(-1, 1))
            snaps = snaps or s
        net.train(was_training)
        return torch.cat(out), snaps

    # ------------------------------------------------------------------------------------ evaluation
    def judge_metrics(
        self, fake: torch.Tensor, real: torch.Tensor, reference: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, split: str = "val",
    ) -> dict[str, float]:
        """FID in LeNet-feature space, class coverage and mean confidence of `fake` (N, 1, H, W)
        (`modules.classifier.judge.judge_samples`, shared with the other generators).

        real: held-out digits (the FID reference). reference: other real digits, for the
        real-vs-real floor (FID of a perfect generator with the same sample sizes). labels: the
        classes `fake` was sampled for (conditional sampling), giving the label accuracy, how
        often the judge reads the digit that was asked for. split: the key prefix, "val" or "test";
        the validation label accuracy keeps its older key `diffusion/label_accuracy`, which runs
        and studies already compare on.
        """
        out = judge_samples(self.judge, fake, real, reference, labels, split=split, device=self.device)
        if split == "val" and labels is not None:
            out["diffusion/label_accuracy"] = out.pop("val/label_accuracy")
        return out

    def noise_seed(self, split: str) -> int:
        """Seed of the sampling noise judged at `split`: eval_seed for validation, one derived from it
        for test. With validation's noise, test would judge the very samples that guidance and steps
        were selected on, and coverage, confidence and label accuracy (functions of the samples
        alone) would repeat the validation values exactly."""
        if split == "val":
            return self.hparams.eval_seed
        return int(np.random.SeedSequence([self.hparams.eval_seed, 1]).generate_state(1)[0])

    def _sample_and_judge(self, split: str) -> torch.Tensor | None:
        """Sample num_eval_samples digits and log the judged metrics against `split`'s digits, seen
        by this epoch's steps; returns the digits (None when num_eval_samples is 0)."""
        real = torch.cat(self._real[split]) if self._real[split] else None
        self._real[split] = []
        if split == "val":
            self._last_val_real = real
        n = self.hparams.num_eval_samples
        if n == 0:
            return None
        fake, _ = self.sample(n, seed=self.noise_seed(split))
        if self.judge is None or real is None or n < 2 or len(real) < 2:
            return fake
        labels = torch.arange(n) % self.config.num_classes if self.config.num_classes else None
        # the floor: FID of n training digits against the same reference, computed once per split
        reference = torch.cat(self._train_real)[:n] if split not in self._fid_floor and self._train_real else None
        metrics = self.judge_metrics(fake, real, reference, labels, split=split)
        if reference is not None:
            self._fid_floor[split] = metrics[f"{split}/fid_floor"]
        if split in self._fid_floor:
            metrics[f"{split}/fid_floor"] = self._fid_floor[split]
        for k, v in metrics.items():
            self.log(k, v, sync_dist=False)
        return fake

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        fake = self._sample_and_judge("val")
        if fake is not None:
            log_image(self.loggers, image_grid(fake[:100], nrow=10), f"samples/step_{self.global_step:07d}.png")

    def on_test_epoch_end(self) -> None:
        if self.judge is None:  # test logs no sample grid, so without a judge sampling would be wasted
            self._real["test"] = []
            return
        self._select_on_validation()
        self._sample_and_judge("test")

    def _select_on_validation(self) -> None:
        """Set guidance_scale and num_sample_steps to the pair with the lowest FID against the last
        validation's digits, among select_guidance x select_sample_steps; logged as select/... and
        selection.csv. The test split plays no part: it is judged afterwards, once."""
        h = self.hparams
        grid = [(w, k) for w in (h.select_guidance or [h.guidance_scale])
                for k in (h.select_sample_steps or [h.num_sample_steps])]
        n = h.num_eval_samples
        if len(grid) < 2 or n < 2 or self._last_val_real is None:
            return
        rows = []
        for w, k in grid:
            h.guidance_scale, h.num_sample_steps = w, k
            fake, _ = self.sample(n, seed=self.noise_seed("val"))
            labels = torch.arange(n) % self.config.num_classes if self.config.num_classes else None
            rows.append((w, k, self.judge_metrics(fake, self._last_val_real, labels=labels)["val/fid"]))
        h.guidance_scale, h.num_sample_steps, fid = min(rows, key=lambda r: r[2])
        self.log_dict({"select/guidance_scale": float(h.guidance_scale),
                       "select/num_sample_steps": float(h.num_sample_steps), "select/val_fid": fid})
        log_text(self.loggers, "guidance_scale,num_sample_steps,val_fid\n" + "".join(f"{w},{k},{f}\n" for w, k, f in rows),
                 "selection.csv")

    def on_train_end(self) -> None:
        """The final artifacts: a sample grid, a denoising strip x_T -> x_0 and the loss curve."""
        if not self.trainer.is_global_zero:
            return
        fake, snaps = self.sample(100, seed=self.hparams.eval_seed, keep=10)
        log_image(self.loggers, image_grid(fake, nrow=10), "samples/final.png")
        # strip: one row per digit (the first 10 of the batch), one column per snapshot from x_T to x_0.
        strip = torch.stack([x[:10] for _, x in snaps], dim=1).flatten(0, 1)  # (10 * S, 1, H, W)
        log_image(self.loggers, image_grid(strip, nrow=len(snaps)), "samples/denoising_strip.png")
        if self._losses:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            losses = torch.stack(self._losses).float().cpu().numpy()
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(losses, lw=0.5, alpha=0.4, label="train/loss")
            k = max(len(losses) // 50, 1)
            if len(losses) >= k:
                ax.plot(np.arange(k - 1, len(losses)), np.convolve(losses, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
            ax.set(xlabel="step", ylabel="L_simple", yscale="log", title="DDPM training loss")
            ax.legend()
            fig.tight_layout()
            log_figure(self.loggers, fig, "loss_curve.png")
            plt.close(fig)

    # ------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "cosine":
            # decays over the run the trainer was given (max_steps, or its epochs' batches)
            sched = cosine_schedule(opt, self.hparams.warmup_steps, int(self.trainer.estimated_stepping_batches),
                                    self.hparams.min_lr_ratio)
            return {"optimizer": opt, "lr_scheduler": sched}
        warm = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
