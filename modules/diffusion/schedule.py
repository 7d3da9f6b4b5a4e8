"""The DDPM math of Ho et al. (2020) and DDIM (Song et al., 2020), apart from any network.

Equation numbers refer to "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239) unless
marked DDIM ("Denoising Diffusion Implicit Models", arXiv:2010.02502), iDDPM ("Improved DDPM",
arXiv:2102.09672), v-prediction (Salimans & Ho, "Progressive Distillation", arXiv:2202.00512) or
min-SNR (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting", arXiv:2303.09556).
DPM-Solver++ (Lu et al., arXiv:2211.01095) is not re-derived here: `sample(sampler="dpm")` drives
diffusers' `DPMSolverMultistepScheduler` with this schedule's betas.

Indexing follows diffusers, not the paper: timesteps are 0-based, so the paper's t = 1..T is
t = 0..T-1 here, and "t - 1" of t = 0 is the clean image (alpha_bar_{-1} := 1). This is what
lets the tests compare every quantity with `DDPMScheduler` / `DDIMScheduler` one to one.

The schedule is an `nn.Module` only so that its (non-persistent) buffers follow the
LightningModule across devices; it has no parameters and nothing in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler
from torch import nn

ScheduleKind = Literal["linear", "cosine"]
Prediction = Literal["eps", "v"]
SamplerKind = Literal["ddpm", "ddim", "dpm"]
# eps_fn(x_t, t) -> predicted noise; x_t (B, C, H, W), t (B,) long. The sampler never sees the network.
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_betas(kind: ScheduleKind, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_1..beta_T in float64.

    linear: Ho et al. sec. 4, beta from 1e-4 to 0.02 over T = 1000.
    cosine: iDDPM eq. 17, alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2) with s = 0.008, and
        beta_t = 1 - alpha_bar(t+1)/alpha_bar(t) clipped at 0.999 so the last step stays finite.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "linear":
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        # Built in float32 like the reference implementation (and diffusers), then widened, so the
        # two agree bit for bit; float32 linspace is exact enough for the betas themselves.
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32).double()
    if kind == "cosine":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999) for i in range(num_timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")


def l_simple(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L_simple, eq. 14: E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2 (mean over pixels and batch)."""
    return F.mse_loss(eps_pred, eps)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample (Hang et al. sec. 3.4), on the eps- or v-MSE.

    The x_0-MSE weighted by min(SNR, gamma) caps the weight of easy, low-noise steps. Written on the
    network's own target: ||eps - eps^||^2 = SNR ||x0 - x0^||^2, so eps takes min(SNR, gamma) / SNR;
    ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2, so v takes min(SNR, gamma) / (SNR + 1).
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0 (the paper uses 5), got {gamma}")
    capped = snr.clamp(max=gamma)
    if prediction == "eps":
        return capped / snr
    if prediction == "v":
        return capped / (snr + 1)
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


class NoiseSchedule(nn.Module):
    """Forward process q, its posterior, and the DDPM / DDIM reverse steps for one beta schedule.

    Args:
        num_timesteps: T, the number of diffusion steps.
        schedule: "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal).
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
        clip_denoised: clamp the predicted x_0 to [-1, 1] before using it (the data range); this is
            what Ho et al.'s sampler does and what diffusers calls `clip_sample`.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: ScheduleKind = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_denoised: bool = True,
    ) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps
        self.kind = schedule
        self.clip_denoised = clip_denoised
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end).float()
        # float32 throughout, like diffusers: a float64 cumprod differs by ~1e-6 after 1000
        # factors, which is noise for training but would break the 1e-6 cross-check.
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha_bar_t, eq. 4
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", alphas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (the clean image).
        self.register_buffer("alphas_cumprod_prev", F.pad(alphas_cumprod[:-1], (1, 0), value=1.0), persistent=False)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """values[t] shaped (B, 1, 1, 1) (or a scalar tensor for an int t) in x's dtype."""
        if isinstance(t, int):
            return values[t].to(x.dtype)
        return values[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    # ----------------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0), eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        x0, noise (B, C, H, W); t (B,) long.
        """
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), (B,) for t (B,) (min-SNR eq. 2 with alpha = sqrt(abar))."""
        abar = self.alphas_cumprod[t]
        return abar / (1 - abar)

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the velocity target (Salimans & Ho sec. 4)."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def eps_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t: what the samplers take from a v-network.

        Follows from x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps and the definition of v; its twin is
        x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.
        """
        abar = self._at(self.alphas_cumprod, t, xt)
        return abar.sqrt() * v + (1 - abar).sqrt() * xt

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Eq. 15 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        abar = self._at(self.alphas_cumprod, t, xt)
        x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. 6-7.

        mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        beta~ = (1 - abar_{t-1}) / (1 - abar_t) beta_t, clamped at 1e-20 (it is 0 at t = 0).
        beta_t is taken as 1 - abar_t / abar_{t-1}, which equals the schedule's beta up to rounding
        and is what diffusers uses, so the two agree to float precision.
        """
        abar = self._at(self.alphas_cumprod, t, xt)
        abar_prev = self._at(self.alphas_cumprod_prev, t, xt)
        alpha_t = abar / abar_prev
        beta_t = 1 - alpha_t
        mean = (abar_prev.sqrt() * beta_t / (1 - abar)) * x0 + (alpha_t.sqrt() * (1 - abar_prev) / (1 - abar)) * xt
        var = ((1 - abar_prev) / (1 - abar) * beta_t).clamp(min=1e-20)
        return mean, var

    # ----------------------------------------------------------------------------- reverse steps
    def ddpm_step(self, eps: torch.Tensor, t: int, xt: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of Algorithm 2 (line 4), x_t -> x_{t-1}, with sigma_t^2 = beta~_t.

        Written as "predict x_0 (eq. 15), then take the posterior mean (eq. 7)", which equals the
        paper's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) when x_0 is not clipped,
        and allows clipping x_0 to the data range when it is.

        Returns (x_{t-1}, predicted x_0). `noise` (z ~ N(0, I)) is needed for t > 0.
        """
        # 1. predicted x_0, eq. 15 (clipped to [-1, 1] if clip_denoised)
        x0 = self.predict_x0(xt, t, eps)
        # 2. posterior mean and variance, eqs. 6-7
        mean, var = self.q_posterior(x0, xt, t)
        # 3. x_{t-1} = mu~ + sigma_t z; no noise on the last step (Algorithm 2: z = 0 if t = 1)
        if t == 0:
            return mean, x0
        if noise is None:
            raise ValueError("ddpm_step needs noise for t > 0")
        return mean + var.sqrt() * noise, x0

    def ddim_timesteps(self, num_steps: int) -> list[int]:
        """The sub-sequence tau of DDIM sec. 4.2, spaced evenly from 0 ("leading" spacing), descending."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"DDIM num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        ratio = self.num_timesteps // num_steps
        return [i * ratio for i in reversed(range(num_steps))]

    def ddim_step(
        self, eps: torch.Tensor, t: int, t_prev: int, xt: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_{t_prev}, DDIM eq. 12 with sigma from DDIM eq. 16 (eta = 0: deterministic).

        Returns (x_{t_prev}, predicted x_0). t_prev < 0 means the clean image (abar = 1).
        """
        abar = self.alphas_cumprod[t].to(xt.dtype)
        abar_prev = self.alphas_cumprod[t_prev].to(xt.dtype) if t_prev >= 0 else torch.ones((), dtype=xt.dtype, device=xt.device)
        # 1. "predicted x_0", DDIM eq. 12 first term (same as DDPM eq. 15)
        x0 = self.predict_x0(xt, t, eps)
        # 2. sigma_t(eta), DDIM eq. 16
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        # 3. "direction pointing to x_t", DDIM eq. 12 second term (uses the unclipped eps)
        direction = (1 - abar_prev - sigma**2).sqrt() * eps
        x_prev = abar_prev.sqrt() * x0 + direction
        # 4. random noise, DDIM eq. 12 third term
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step needs noise when eta > 0")
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    def dpm_solver(self, num_steps: int, order: int = 2, timesteps: list[int] | None = None):
        """diffusers' DPMSolverMultistepScheduler (DPM-Solver++, multistep, data prediction) on these betas.

        Its "thresholding" with sample_max_value = 1 clips the predicted x_0 to [-1, 1], the same as
        clip_denoised. At order 1 and on the same timesteps it is DDIM with eta = 0 (Lu et al.
        sec. 4.1), which the tests check. Timesteps: diffusers' "linspace" spacing (from T - 1 down)
        unless given.
        """
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"DPM-Solver num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        solver = DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_timesteps, trained_betas=self.betas.cpu().numpy(), solver_order=order,
            prediction_type="epsilon", algorithm_type="dpmsolver++", thresholding=self.clip_denoised, sample_max_value=1.0,
        )
        solver.set_timesteps(None if timesteps else num_steps, device=self.betas.device, timesteps=timesteps)
        return solver

    # ----------------------------------------------------------------------------- sampling loops
    @torch.no_grad()
    def sample(
        self,
        eps_fn: EpsFn,
        shape: tuple[int, ...],
        sampler: SamplerKind = "ddpm",
        num_steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        keep: int = 0,
    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Draw x_T ~ N(0, I) and denoise it to x_0 (Algorithm 2, or DDIM / DPM-Solver++ with num_steps steps).

        Random numbers are drawn in diffusers' pipeline order (x_T first, then one draw per step
        that needs noise) so a seeded generator reproduces `DDPMPipeline` / `DDIMPipeline`.

        Args:
            eps_fn: the noise predictor, eps_fn(x_t (B,C,H,W), t (B,) long) -> (B,C,H,W).
            shape: (B, C, H, W) of the batch to draw.
            sampler: "ddpm" (ancestral, all T steps), "ddim", or "dpm" (DPM-Solver++(2M), diffusers).
            num_steps: DDIM / DPM-Solver steps (default T); ignored by "ddpm".
            eta: DDIM stochasticity, 0 = deterministic, 1 = DDPM-like variance.
            generator: torch.Generator on `device` for reproducible draws.
            device: where x_t lives.
            keep: also return ~`keep` snapshots (t, x_t) from x_T to x_0, for a denoising strip.

        Returns:
            (x_0 (B, C, H, W), snapshots).
        """
        if sampler == "ddpm":
            steps = list(reversed(range(self.num_timesteps)))
            prevs = [t - 1 for t in steps]
        elif sampler == "ddim":
            steps = self.ddim_timesteps(num_steps or self.num_timesteps)
            prevs = steps[1:] + [-1]
        elif sampler == "dpm":
            solver = self.dpm_solver(num_steps or self.num_timesteps)
            steps = [int(t) for t in solver.timesteps]
            prevs = steps[1:] + [-1]
        else:
            raise ValueError(f"sampler must be 'ddpm', 'ddim' or 'dpm', got {sampler!r}")
        x = torch.randn(shape, generator=generator, device=device)
        snapshots: list[tuple[int, torch.Tensor]] = []
        every = max(len(steps) // keep, 1) if keep else 0
        for i, (t, t_prev) in enumerate(zip(steps, prevs)):
            if keep and i % every == 0:
                snapshots.append((t, x.detach().cpu()))
            eps = eps_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long))
            if sampler == "ddpm":
                noise = torch.randn(shape, generator=generator, device=device) if t > 0 else None
                x, _ = self.ddpm_step(eps, t, x, noise)
            elif sampler == "dpm":
                x = solver.step(eps, t, x).prev_sample
            else:
                noise = torch.randn(shape, generator=generator, device=device) if eta > 0 else None
                x, _ = self.ddim_step(eps, t, t_prev, x, eta, noise)
        if keep:
            snapshots.append((-1, x.detach().cpu()))
        return x, snapshots
