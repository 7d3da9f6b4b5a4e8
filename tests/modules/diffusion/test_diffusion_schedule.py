"""The project's DDPM/DDIM math against diffusers' schedulers (the reference) and the paper's own forms."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from modules.diffusion.schedule import NoiseSchedule, l_simple, make_betas, min_snr_weight

T = 1000
ATOL = 1e-6
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def _pair(kind, clip=True):
    ours = NoiseSchedule(T, kind, clip_denoised=clip)
    ddpm = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[kind], clip_sample=clip, variance_type="fixed_small")
    return ours, ddpm


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_match_diffusers(kind):
    ours, ddpm = _pair(kind)
    torch.testing.assert_close(ours.alphas_cumprod, ddpm.alphas_cumprod, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.betas, ddpm.betas, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_matches_add_noise(kind):
    ours, ddpm = _pair(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(16, 1, 8, 8, generator=g)
    t = torch.randint(0, T, (16,), generator=g)
    t[:2] = torch.tensor([0, T - 1])  # both ends of the chain
    torch.testing.assert_close(ours.q_sample(x0, t, noise), ddpm.add_noise(x0, noise, t), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 10, 500, 999])
def test_posterior_mean_and_variance_match_diffusers(kind, t):
    # diffusers has no public posterior; its step is "mean + sqrt(var) * z" with z drawn from the
    # generator, so with the same seed we recover its mean from the step output.
    ours, ddpm = _pair(kind, clip=False)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    xt = torch.randn(4, 1, 8, 8, generator=g)
    abar = ddpm.alphas_cumprod[t]
    eps = (xt - abar.sqrt() * x0) / (1 - abar).sqrt()  # the eps whose eq.-15 x_0 is exactly x0
    var_ref = ddpm._get_variance(t)
    out = ddpm.step(eps, t, xt, generator=torch.Generator().manual_seed(7))
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7)) if t > 0 else torch.zeros_like(xt)
    mean_ref = out.prev_sample - var_ref.sqrt() * z
    # x_0 as diffusers recovered it (at t = 999 eq. 15 divides by sqrt(abar) ~ 1e-4, so it is not
    # bit-equal to x0): the posterior is then compared on identical inputs.
    mean, var = ours.q_posterior(out.pred_original_sample, xt, t)
    torch.testing.assert_close(var, var_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(mean, mean_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [0, 3, 250, 998])
def test_ddpm_step_matches_diffusers(kind, clip, t):
    ours, ddpm = _pair(kind, clip)
    g = torch.Generator().manual_seed(t)
    xt = torch.randn(4, 1, 8, 8, generator=g)
    eps = torch.randn(4, 1, 8, 8, generator=g)
    ref = ddpm.step(eps, t, xt, generator=torch.Generator().manual_seed(3))
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x_prev, x0 = ours.ddpm_step(eps, t, xt, z)
    torch.testing.assert_close(x0, ref.pred_original_sample, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(x_prev, ref.prev_sample, atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(kind, eta):
    ours = NoiseSchedule(T, kind)
    ddim = DDIMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[kind], clip_sample=True, set_alpha_to_one=True)
    ddim.set_timesteps(20)
    assert ours.ddim_timesteps(20) == ddim.timesteps.tolist()
    steps = ours.ddim_timesteps(20)
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        g = torch.Generator().manual_seed(t)
        xt = torch.randn(4, 1, 8, 8, generator=g)
        eps = torch.randn(4, 1, 8, 8, generator=g)
        ref = ddim.step(eps, t, xt, eta=eta, generator=torch.Generator().manual_seed(5))
        z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        x_prev, x0 = ours.ddim_step(eps, t, t_prev, xt, eta, z)
        torch.testing.assert_close(x0, ref.pred_original_sample, atol=ATOL, rtol=1e-6)
        torch.testing.assert_close(x_prev, ref.prev_sample, atol=ATOL, rtol=1e-6)


def _toy_eps(x, t):
    # A fixed, t-dependent "network" so whole sampling loops can be compared.
    return 0.3 * torch.tanh(x) + 0.01 * t.float().view(-1, 1, 1, 1).sin()


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_full_sampling_loop_matches_diffusers(sampler, eta):
    """Same seed, same eps-function: our loop and diffusers' pipeline order give the same x_0."""
    n_train = 50  # a short chain keeps the DDPM loop fast
    ours = NoiseSchedule(n_train, "linear", beta_start=1e-3, beta_end=0.2)
    shape = (3, 1, 6, 6)
    x, _ = ours.sample(_toy_eps, shape, sampler, num_steps=10, eta=eta, generator=torch.Generator().manual_seed(0))
    if sampler == "ddpm":
        ref = DDPMScheduler(num_train_timesteps=n_train, beta_start=1e-3, beta_end=0.2, clip_sample=True)
        ref.set_timesteps(n_train)
        kwargs = {}
    else:
        ref = DDIMScheduler(num_train_timesteps=n_train, beta_start=1e-3, beta_end=0.2, clip_sample=True)
        ref.set_timesteps(10)
        kwargs = {"eta": eta}
    g = torch.Generator().manual_seed(0)
    y = torch.randn(shape, generator=g)
    for t in ref.timesteps:
        y = ref.step(_toy_eps(y, torch.full((3,), int(t))), t, y, generator=g, **kwargs).prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_ddpm_step_equals_algorithm_2_without_clipping():
    """Ho et al. Algorithm 2 line 4 in the paper's own form: 1/sqrt(a_t) (x_t - b_t/sqrt(1-abar_t) eps) + sigma_t z."""
    s = NoiseSchedule(T, "linear", clip_denoised=False)
    g = torch.Generator().manual_seed(0)
    for t in [1, 100, 999]:
        xt, eps, z = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
        a, b, abar = s.alphas[t].double(), s.betas[t].double(), s.alphas_cumprod[t].double()
        abar_prev = s.alphas_cumprod[t - 1].double()
        sigma = ((1 - abar_prev) / (1 - abar) * b).sqrt()
        paper = (xt - b / (1 - abar).sqrt() * eps) / a.sqrt() + sigma * z
        ours, _ = s.ddpm_step(eps, t, xt, z)
        torch.testing.assert_close(ours, paper, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_exact_eps_recovers_a_point_mass(sampler):
    """If the data is one image x*, the ideal eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)
    and both samplers must land on x* from any x_T; a wrong coefficient anywhere breaks this."""
    s = NoiseSchedule(200, "cosine", clip_denoised=False)
    x_star = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)

    def eps_fn(x, t):
        abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x_star) / (1 - abar).sqrt()

    x, snaps = s.sample(eps_fn, (5, 1, 4, 4), sampler, num_steps=20, generator=torch.Generator().manual_seed(0), keep=4)
    torch.testing.assert_close(x, x_star.expand(5, 1, 4, 4), atol=1e-4, rtol=0)
    assert snaps[0][0] == {"ddpm": 199, "ddim": 190, "dpm": 199}[sampler]
    assert snaps[-1][0] == -1 and len(snaps) >= 4


def test_q_sample_has_the_marginal_of_eq_4():
    s = NoiseSchedule(T, "linear")
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 300)
    xt = s.q_sample(x0, t, torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    abar = s.alphas_cumprod[300]
    assert abs(xt.mean() - abar.sqrt() * 0.5) < 0.02
    assert abs(xt.var() - (1 - abar)) < 0.02


def test_cosine_schedule_golden_values():
    # iDDPM eq. 17: alpha_bar_0 = (cos((1/T + s)/(1+s) pi/2) / cos(s/(1+s) pi/2))^2; the last beta is capped.
    b = make_betas("cosine", T)
    assert b.max().item() == pytest.approx(0.999)
    assert b[0].item() == pytest.approx(4.1284e-05, rel=1e-3)
    assert NoiseSchedule(T, "linear").alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)


def test_l_simple_is_the_mean_squared_error():
    a, b = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert l_simple(a, b).item() == 1.0
    assert l_simple(2 * a, b).item() == 4.0


def test_bad_schedule_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="schedule must be"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule(10, "linear", beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule(1)
    with pytest.raises(ValueError, match="DDIM num_steps"):
        NoiseSchedule(10).ddim_timesteps(11)
    with pytest.raises(ValueError, match="sampler"):
        NoiseSchedule(10).sample(_toy_eps, (1, 1, 2, 2), "euler")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_v_target_matches_diffusers_and_inverts(kind):
    """v = sqrt(abar) eps - sqrt(1-abar) x0 (diffusers' get_velocity); x0 = sqrt(abar) x_t - sqrt(1-abar) v,
    and eps_from_v gives back the noise."""
    ours, ddpm = _pair(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 5, 5, generator=g), torch.randn(4, 1, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = ours.q_sample(x0, t, eps)
    v = ours.v_target(x0, t, eps)
    torch.testing.assert_close(v, ddpm.get_velocity(x0, eps, t), atol=ATOL, rtol=0)
    abar = ours.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(abar.sqrt() * xt - (1 - abar).sqrt() * v, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.eps_from_v(xt, t, v), eps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_matches_diffusers_training_scripts(prediction):
    """SNR from diffusers' compute_snr; weights as in its train_text_to_image.py (min(snr, gamma) / snr for
    epsilon, / (snr + 1) for v_prediction)."""
    ours, ddpm = _pair("linear")
    t = torch.tensor([0, 1, 50, 300, 999])
    snr = ours.snr(t)
    torch.testing.assert_close(snr, compute_snr(ddpm, t), rtol=1e-5, atol=0)
    ref = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    ref = ref / snr if prediction == "eps" else ref / (snr + 1)
    w = min_snr_weight(snr, 5.0, prediction)
    torch.testing.assert_close(w, ref)
    # at low noise (SNR > 5) eps-weights fall below 1; at high noise they are 1 (eps) and SNR / (SNR + 1) (v)
    assert w[0] < 1e-3 and w[-1] == pytest.approx(1.0 if prediction == "eps" else float(snr[-1] / (snr[-1] + 1)))
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weight(snr, 0.0, prediction)


def test_dpm_solver_of_order_one_is_ddim():
    """DPM-Solver++ at order 1 is DDIM (eta = 0) on the same timesteps (Lu et al. sec. 4.1): diffusers'
    solver, driven with our betas, against our own DDIM loop, without clipping so both use the model's eps."""
    s = NoiseSchedule(100, "linear", clip_denoised=False)
    steps = s.ddim_timesteps(10)
    solver = s.dpm_solver(10, order=1, timesteps=steps)
    assert [int(t) for t in solver.timesteps] == steps
    shape = (3, 1, 6, 6)
    ours, _ = s.sample(_toy_eps, shape, "ddim", num_steps=10, generator=torch.Generator().manual_seed(0))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for t in solver.timesteps:
        x = solver.step(_toy_eps(x, torch.full((3,), int(t))), t, x).prev_sample
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler,num_steps,calls", [("ddpm", 7, 50), ("ddim", 7, 7), ("dpm", 7, 7), ("dpm", 1, 1)])
def test_sampler_step_counts(sampler, num_steps, calls):
    """DDPM takes all T steps; DDIM and DPM-Solver call the network num_steps times."""
    s = NoiseSchedule(50, "linear")
    seen = []

    def eps_fn(x, t):
        seen.append(int(t[0]))
        return _toy_eps(x, t)

    s.sample(eps_fn, (2, 1, 4, 4), sampler, num_steps=num_steps, generator=torch.Generator().manual_seed(0))
    assert len(seen) == calls and seen == sorted(seen, reverse=True)
    with pytest.raises(ValueError, match="num_steps must be in"):
        s.dpm_solver(51)
