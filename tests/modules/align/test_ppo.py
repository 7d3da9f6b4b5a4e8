"""PPO's pieces against hand-computed cases: the GAE recursion, the clipped surrogate, the value
clip, the KL estimators (zero where pi = pi_ref) and the adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from modules.align.ppo import (
    AdaptiveKLController,
    clipped_surrogate,
    gae,
    per_token_kl,
    token_rewards,
    value_loss,
    whiten,
)


def test_gae_recursion_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    # deltas: d2 = 2 - 1.5 = 0.5 (terminal); d1 = 0 + 0.9*1.5 - 1 = 0.35; d0 = 1 + 0.9*1.0 - 0.5 = 1.4
    a2 = 0.5
    a1 = 0.35 + gamma * lam * a2  # 0.71
    a0 = 1.4 + gamma * lam * a1  # 1.9112
    adv, ret = gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5]]))


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value_and_ignores_padding():
    r = torch.tensor([[0.0, 1.0, 3.0, 9.0], [2.0, 0.0, 5.0, 7.0]])
    v = torch.tensor([[1.0, 2.0, 0.5, 4.0], [0.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # row 0 ends at t = 2
    adv, ret = gae(r, v, mask, 1.0, 1.0)
    torch.testing.assert_close(ret[0, :3], torch.tensor([4.0, 4.0, 3.0]))  # reward-to-go, padding unseen
    torch.testing.assert_close(ret[1], torch.tensor([14.0, 12.0, 12.0, 7.0]))
    assert adv[0, 3] == 0 and ret[0, 3] == 0
    torch.testing.assert_close(adv, (ret - v) * mask)


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 2.0 - 0.15], [-0.2, -1.0 - 0.25, 0.0]]))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))  # ratios 1.5, 0.5, 1.1, 1.5
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    loss, clipfrac = clipped_surrogate(logps, old, adv, torch.ones(1, 4), clip_range=0.2)
    # per token max(-A r, -A clip(r)): A>0, r=1.5 -> -1.2 (clipped); A<0, r=0.5 -> 0.8 (clipped);
    # A>0, r=1.1 inside -> -2.2; A<0, r=1.5 -> max(1.5, 1.2) = 1.5 (the unclipped, pessimistic side)
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2 + 1.5) / 4)
    assert float(clipfrac) == pytest.approx(0.5)
    logps.requires_grad_(True)
    clipped_surrogate(logps, old, adv, torch.ones(1, 4), 0.2)[0].backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] == 0 and logps.grad[0, 2] != 0 and logps.grad[0, 3] != 0


def test_value_loss_clips_the_change_of_the_value():
    old, ret, mask = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 1.0]]), torch.ones(1, 2)
    v = torch.tensor([[2.0, 1.5]])
    # t0: max((2-3)^2, (1.2-3)^2) = 3.24; t1: max(0.25, (1.2-1)^2 = 0.04) = 0.25
    assert float(value_loss(v, old, ret, mask, 0.2)) == pytest.approx(0.5 * (3.24 + 0.25) / 2)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_are_zero_at_initialisation(estimator):
    logps = -torch.rand(3, 7) * 4
    assert torch.equal(per_token_kl(logps, logps.clone(), estimator), torch.zeros(3, 7))


def test_kl_estimators_by_hand_and_unbiased_on_samples():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    log_r = math.log(0.5)  # log pi_ref / pi
    assert float(per_token_kl(lp, ref, "k1")) == pytest.approx(-log_r)
    assert float(per_token_kl(lp, ref, "k2")) == pytest.approx(0.5 * log_r**2)
    assert float(per_token_kl(lp, ref, "k3")) == pytest.approx(0.5 - 1 - log_r)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = float((p * (p / q).log()).sum())
    for k in ("k1", "k3"):
        assert float(per_token_kl(p.log()[y], q.log()[y], k).mean()) == pytest.approx(exact, abs=0.01), k
    with pytest.raises(ValueError, match="KL estimator"):
        per_token_kl(lp, ref, "k4")


def test_adaptive_kl_controller_follows_the_target_and_fixed_stays():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert ctl.update(5.4, 10) == pytest.approx(0.102 * (1 - 0.1 * 10 / 100))  # 5.4 / 6 - 1 = -0.1, unclipped
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(100.0, 1000) == 0.1


def test_whiten_has_zero_mean_unit_variance_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert float(w[0, :3].mean()) == pytest.approx(0.0, abs=1e-6) and w[0, 3] == 0
    assert float((w[0, :3] ** 2).mean()) == pytest.approx(1.0, abs=1e-5)
