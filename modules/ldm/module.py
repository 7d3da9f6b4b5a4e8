"""ConditioningModule: a DDPM on two-digit canvases prompted "3 7", in pixels or in a VAE's latents.

Stable Diffusion in miniature when space="latent" and conditioning="cross_attention": the canvas
is encoded by the frozen autoencoder of modules/ldm/autoencoder.py (4 x 7 x 14 latents, scaled to
unit variance), the DDPM math of modules/diffusion/schedule.py runs on the latents, a UNet reads
the prompt through cross-attention, and the result is decoded to pixels for the judge.

    practicum run configs/ldm/vae_mnist5k.yaml            # the autoencoder -> checkpoints/ldm/vae_mnist5k.ckpt
    practicum run configs/classifier/lenet_mnist5k.yaml   # the judge -> checkpoints/classifier/lenet_mnist5k.ckpt
    practicum run configs/ldm/canvas_latent.yaml
(`practicum study configs/studies/conditioning.yaml` trains both as stages.)

The judge (the LeNet of the DDPM, modules/classifier/judge.py) scores each half of a sampled
canvas on its own, for the split's prompts:
    {val,test}/acc_left, acc_right   how often it reads the asked-for digit in that half
    {val,test}/acc_both              both halves right (the prompt was followed)
    {val,test}/fid_left, fid_right   FID (LeNet features) of that half against the split's real digits
    {val,test}/fid_floor             FID of as many real training digits against the same reference
    {val,test}/attn_routing          cross-attention variants: the weight the left half puts on the
                                     first token and the right half on the second (0.5 = no routing)
    perf/sample_time_s               wall time of sampling (and decoding) per canvas
Artifacts: samples/final.png (a grid for fixed prompts), attention/maps.png (cross-attention variants).
"""

from __future__ import annotations

import time
from typing import Literal

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel

from modules.artifacts import image_grid, log_figure, log_image
from modules.classifier.judge import judge_samples
from modules.classifier.model import LeNet
from modules.classifier.module import attach_judge
from modules.diffusion.module import ema_with_warmup
from modules.diffusion.schedule import NoiseSchedule, l_simple
from modules.ldm.autoencoder import SpatialVAE
from modules.ldm.autoencoder_module import load_autoencoder
from modules.ldm.model import (NULL, ConditionalDenoiser, ConditionalDenoiserConfig, Conditioning,
                               recording_cross_attention, token_maps)

HEIGHT, WIDTH = 28, 56  # the canvas
FIGURE_PROMPTS = [[a, (a + 3) % 10] for a in range(10)] + [[(7 * a + 2) % 10, a] for a in range(10)]


def judge_halves(judge: LeNet, fake: torch.Tensor, real: torch.Tensor, prompts: torch.Tensor,
                 reference: torch.Tensor | None = None, split: str = "val") -> dict[str, float]:
    """The judge's verdict on each half of `fake` canvases (N, 1, 28, 56) sampled for `prompts` (N, 2).

    real: real canvases of the split; both their halves are the FID reference of each half.
    reference: real training canvases, for the floor (real digits against the same reference).
    """
    width = fake.shape[-1] // 2
    real_digits = torch.cat(real.split(width, dim=-1))
    out: dict[str, float] = {}
    correct = []
    for i, side in enumerate(("left", "right")):
        half = fake[..., i * width:(i + 1) * width]
        m = judge_samples(judge, half, real_digits, labels=prompts[:, i], split=split)
        out[f"{split}/acc_{side}"] = m[f"{split}/label_accuracy"]
        out[f"{split}/fid_{side}"] = m[f"{split}/fid"]
        with torch.no_grad():
            correct.append(torch.cat([judge(c.to(next(judge.parameters()).device)).argmax(-1).cpu()
                                      for c in half.split(500)]) == prompts[:, i].cpu())
    out[f"{split}/acc_both"] = (correct[0] & correct[1]).float().mean().item()
    if reference is not None:
        ref = torch.cat(reference.split(width, dim=-1))[: len(fake)]
        out[f"{split}/fid_floor"] = judge_samples(judge, ref, real_digits, split=split)[f"{split}/fid"]
    return out


def routing_score(maps: torch.Tensor) -> float:
    """maps (B, 2, H, W), the weights over the two tokens: the mean weight of the left half on token 0
    and of the right half on token 1. 1 = each half reads only its own token, 0.5 = no preference."""
    w = maps.shape[-1] // 2
    return 0.5 * (maps[:, 0, :, :w].mean() + maps[:, 1, :, w:].mean()).item()


class ConditioningModule(L.LightningModule):
    """DDPM on (canvas (B, 1, 28, 56), prompt (B, 2)) batches (CanvasDataModule), classifier-free guided.

    Args:
        space: "pixel" (the UNet denoises canvases) or "latent" (it denoises the VAE's latents).
        conditioning: "cross_attention" (the prompt's tokens as keys and values) or "embedding" (the
            two token embeddings concatenated into the time embedding).
        vae_checkpoint: SpatialVAEModule checkpoint, required for space="latent".
        latent_channels: C of that VAE's latent (checked against it).
        latent_factor: its downsampling factor f (28 / f is the latent side; checked against it).
        block_out_channels: UNet channels per level.
        cross_attention: a transformer block per level (one bool each).
        layers_per_block: ResNet blocks per level.
        attention_head_dim: channels per attention head.
        context_dim: width of a prompt token.
        schedule: beta schedule, "linear" or "cosine".
        num_timesteps: T.
        cond_drop_prob: probability of dropping the whole prompt (two NULL tokens) in training.
        guidance_scale: w in eps_null + w (eps_prompt - eps_null); 1 = conditional, 0 = unconditional.
        lr: AdamW learning rate (after a linear warmup).
        warmup_steps: learning-rate warmup steps.
        ema_decay: final EMA decay of the sampling weights.
        num_sample_steps: DDIM steps (eta = 0) when sampling.
        num_eval_samples: canvases sampled at each evaluation, for the split's first prompts.
        eval_batch_size: canvases per sampling batch.
        classifier_checkpoint: the LeNet judge (ClassifierModule checkpoint); None skips the judged metrics.
        eval_seed: seed of the evaluation noise.
    """

    def __init__(
        self,
        space: Literal["pixel", "latent"] = "latent",
        conditioning: Conditioning = "cross_attention",
        vae_checkpoint: str | None = None,
        latent_channels: int = 4,
        latent_factor: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        cross_attention: tuple[bool, ...] = (False, True, True),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        context_dim: int = 32,
        schedule: Literal["linear", "cosine"] = "linear",
        num_timesteps: int = 1000,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 2.0,
        lr: float = 1e-3,
        warmup_steps: int = 100,
        ema_decay: float = 0.999,
        num_sample_steps: int = 20,
        num_eval_samples: int = 500,
        eval_batch_size: int = 250,
        classifier_checkpoint: str | None = None,
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        if space not in ("pixel", "latent"):
            raise ValueError(f"space must be 'pixel' or 'latent', got {space!r}")
        if space == "latent" and not vae_checkpoint:
            raise ValueError("space='latent' needs vae_checkpoint: train configs/ldm/vae_mnist5k.yaml first and pass "
                             "--model.init_args.vae_checkpoint=checkpoints/ldm/vae_mnist5k.ckpt (or runs:/ID)")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if cond_drop_prob == 0.0 and guidance_scale != 1.0:
            raise ValueError("guidance_scale != 1 needs an unconditional model: set cond_drop_prob > 0 (e.g. 0.1)")
        if not 1 <= num_sample_steps <= num_timesteps:
            raise ValueError(f"num_sample_steps must be in [1, num_timesteps={num_timesteps}], got {num_sample_steps}")
        if HEIGHT % latent_factor or WIDTH % latent_factor:
            raise ValueError(f"latent_factor={latent_factor} does not divide the {HEIGHT} x {WIDTH} canvas")
        if num_eval_samples < 0 or eval_batch_size < 1:
            raise ValueError(f"need num_eval_samples >= 0 and eval_batch_size >= 1, got {num_eval_samples}, {eval_batch_size}")
        self.save_hyperparameters()
        latent = space == "latent"
        # Latents are unbounded: clipping the predicted x_0 to [-1, 1] is for pixels only.
        self.schedule = NoiseSchedule(num_timesteps, schedule, clip_denoised=not latent)
        f = latent_factor if latent else 1
        self.config = ConditionalDenoiserConfig(
            in_channels=latent_channels if latent else 1, height=HEIGHT // f, width=WIDTH // f,
            block_out_channels=tuple(block_out_channels), cross_attention=tuple(cross_attention),
            layers_per_block=layers_per_block, attention_head_dim=attention_head_dim, context_dim=context_dim,
            conditioning=conditioning,
        )
        self.net = ConditionalDenoiser(self.config)
        self.ema = AveragedModel(self.net, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        # Plain dicts: the frozen judge and autoencoder stay out of this model's checkpoint (the
        # autoencoder is its own run's, as Stable Diffusion ships its VAE apart from its UNet).
        self._judge: dict[str, LeNet] = {}
        self._vae: dict[str, SpatialVAE] = {}
        self._real: list[torch.Tensor] = []
        self._prompts: list[torch.Tensor] = []
        self._train_real: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        attach_judge(self._judge, self.hparams.classifier_checkpoint, "ConditioningModule", stage)
        if self.hparams.space == "latent" and "vae" not in self._vae:
            vae = load_autoencoder(self.hparams.vae_checkpoint)
            c = vae.config
            if c.latent_channels != self.hparams.latent_channels or c.factor != self.hparams.latent_factor:
                raise ValueError(
                    f"{self.hparams.vae_checkpoint} has a {c.latent_channels}-channel latent at factor {c.factor}, but "
                    f"latent_channels={self.hparams.latent_channels}, latent_factor={self.hparams.latent_factor}: make them match")
            self._vae["vae"] = vae

    @property
    def judge(self) -> LeNet | None:
        return self._judge.get("lenet")

    @property
    def vae(self) -> SpatialVAE | None:
        vae = self._vae.get("vae")
        return vae.to(self.device) if vae is not None else None

    def encode(self, canvas: torch.Tensor) -> torch.Tensor:
        """What the DDPM models: the canvas itself, or its scaled latent z ~ q(z|x)."""
        if self.vae is None:
            return canvas
        with torch.no_grad():
            return self.vae.to_latent(canvas)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1) if self.vae is None else self.vae.from_latent(x0)

    # ------------------------------------------------------------------------------------ training
    def _loss(self, x0: torch.Tensor, prompt: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (DDPM eq. 14) at t ~ U{0..T-1}; x0 (B, C, H, W) pixels or latents."""
        t = torch.randint(0, self.schedule.num_timesteps, (len(x0),), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        return l_simple(self.net(self.schedule.q_sample(x0, t, noise), t, prompt), noise)

    def training_step(self, batch, batch_idx):
        canvas, prompt = batch
        if self.hparams.cond_drop_prob > 0:  # classifier-free guidance: drop the whole prompt
            drop = torch.rand(len(prompt), device=prompt.device) < self.hparams.cond_drop_prob
            prompt = torch.where(drop[:, None], torch.full_like(prompt, NULL), prompt)
        loss = self._loss(self.encode(canvas), prompt)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        if sum(len(r) for r in self._train_real) < self.hparams.num_eval_samples:
            self._train_real.append(canvas.detach().cpu())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.net)

    def _eval_step(self, batch, batch_idx: int, split: str) -> None:
        canvas, prompt = batch
        g = torch.Generator(device=canvas.device).manual_seed(self.hparams.eval_seed + batch_idx)
        self.log(f"{split}/loss", self._loss(self.encode(canvas), prompt, g), on_epoch=True)
        if not self.trainer.sanity_checking:
            self._real.append(canvas.cpu())
            self._prompts.append(prompt.cpu())

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    # ------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: torch.Tensor | None, n: int | None = None, seed: int = 0,
               use_ema: bool = True) -> torch.Tensor:
        """Canvases (n, 1, 28, 56) in [-1, 1] for `prompts` (n, 2) by DDIM (eta = 0) with guidance;
        prompts None draws n unconditional canvases (the prompt dropped)."""
        if prompts is None and n is None:
            raise ValueError("sample needs prompts (n, 2) or, for unconditional canvases, n")
        n = len(prompts) if prompts is not None else n
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        g = torch.Generator(device=self.device).manual_seed(seed)
        c = self.config
        out = []
        for start in range(0, n, self.hparams.eval_batch_size):
            b = min(self.hparams.eval_batch_size, n - start)
            p = prompts[start:start + b].to(self.device) if prompts is not None else None

            def eps_fn(x, t, p=p):
                return net.guided(x, t, p, self.hparams.guidance_scale)

            x, _ = self.schedule.sample(eps_fn, (b, c.in_channels, c.height, c.width), "ddim",
                                        self.hparams.num_sample_steps, generator=g, device=self.device)
            out.append(self.decode(x))
        net.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def attention_maps(self, canvas: torch.Tensor, prompts: torch.Tensor, t: int | None = None,
                       seed: int = 0) -> torch.Tensor:
        """(B, 2, 28, 56): each canvas position's cross-attention weight on each prompt token, averaged
        over heads and layers, for the canvases noised to step t (default T / 2) and denoised once."""
        net = self.ema.module
        t = self.schedule.num_timesteps // 2 if t is None else t
        x0 = self.encode(canvas.to(self.device))
        g = torch.Generator(device=self.device).manual_seed(seed)
        ts = torch.full((len(x0),), t, device=self.device, dtype=torch.long)
        xt = self.schedule.q_sample(x0, ts, torch.randn(x0.shape, generator=g, device=self.device))
        with recording_cross_attention(net) as rec:
            net(xt, ts, prompts.to(self.device))
        maps = token_maps(rec.maps, self.config.height, self.config.width)
        return torch.nn.functional.interpolate(maps, size=(HEIGHT, WIDTH), mode="nearest")

    # ------------------------------------------------------------------------------------ evaluation
    def _sample_and_judge(self, split: str) -> None:
        real, prompts = (torch.cat(v) if v else None for v in (self._real, self._prompts))
        self._real, self._prompts = [], []
        n = min(self.hparams.num_eval_samples, len(prompts) if prompts is not None else 0)
        if n == 0:
            return
        seed = self.hparams.eval_seed if split == "val" else self.hparams.eval_seed + 1
        t0 = time.perf_counter()
        fake = self.sample(prompts[:n], seed=seed)
        metrics = {"perf/sample_time_s": (time.perf_counter() - t0) / n}
        if self.config.conditioning == "cross_attention":
            metrics[f"{split}/attn_routing"] = routing_score(self.attention_maps(fake, prompts[:n], seed=seed))
        if self.judge is not None and n >= 2:
            reference = torch.cat(self._train_real) if self._train_real else None
            metrics.update(judge_halves(self.judge, fake, real, prompts[:n], reference, split))
        self.log_dict(metrics)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._sample_and_judge("val")

    def on_test_epoch_end(self) -> None:
        self._sample_and_judge("test")

    def on_train_end(self) -> None:
        """The figures: canvases for fixed prompts, and where each region's cross-attention looks."""
        if not self.trainer.is_global_zero:
            return
        prompts = torch.tensor(FIGURE_PROMPTS)
        fake = self.sample(prompts, seed=self.hparams.eval_seed)
        log_image(self.loggers, image_grid(fake, nrow=4), "samples/final.png")
        if self.config.conditioning == "cross_attention":
            fig = attention_figure(fake[:8], prompts[:8], self.attention_maps(fake[:8], prompts[:8]))
            log_figure(self.loggers, fig, "attention/maps.png")
            import matplotlib.pyplot as plt

            plt.close(fig)

    # ------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr)
        warm = max(self.hparams.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def attention_figure(canvas: torch.Tensor, prompts: torch.Tensor, maps: torch.Tensor):
    """One row per canvas: the sample, then the weight of each position on the first and on the second token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(canvas)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 1.3 * rows), squeeze=False)
    for i in range(rows):
        a, b = (int(v) for v in prompts[i])
        axes[i, 0].imshow(canvas[i, 0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[i, 0].set_title(f'"{a} {b}"', fontsize=8)
        for j, tok in enumerate((a, b)):
            im = axes[i, j + 1].imshow(maps[i, j].cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            axes[i, j + 1].set_title(f'weight on token {j + 1} ("{tok}")', fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.6)
    return fig

