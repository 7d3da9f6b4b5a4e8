"""The reward model's Bradley-Terry loss and RLOO's loss against TRL's own code on the same tensors,
and the calibration bins against a hand count."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from modules.align.objective import (
    bradley_terry_loss,
    calibration_bins,
    expected_calibration_error,
    reward_metrics,
    rloo_advantages,
    rloo_loss,
)

IDENTITY = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction: t,
                           device="cpu")


def trl_reward_loss(chosen, rejected, margin=None, center=None):
    """TRL 1.16's `RewardTrainer.compute_loss` on given rewards: a stand-in model returns them as its
    (2B, 1) logits, and the trainer's few attributes the loss path reads are set."""
    from trl import RewardTrainer

    b = chosen.numel()
    logits = torch.cat([chosen, rejected])[:, None]
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=IDENTITY,
                              args=SimpleNamespace(center_rewards_coefficient=center),
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"attention_mask": torch.ones(2 * b, 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(trainer, lambda **kw: SimpleNamespace(logits=logits), inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_and_metrics_equal_trl_reward_trainer(center, with_margin):
    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(16, generator=g, dtype=torch.float64) + 0.5, torch.randn(16, generator=g,
                                                                                          dtype=torch.float64)
    margin = torch.rand(16, generator=g, dtype=torch.float64) if with_margin else None
    want, trl_metrics = trl_reward_loss(chosen, rejected, margin, center)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin, center), want)
    ours = reward_metrics(chosen, rejected)
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert float(ours[key]) == pytest.approx(trl_metrics[key], rel=1e-9), key
    assert 0 < trl_metrics["accuracy"] < 1  # pairs ranked both ways: the accuracy check can fail


def test_centering_term_changes_the_loss_only_when_rewards_are_off_centre():
    c, r = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])  # mean (r_w + r_l) = 0
    assert float(bradley_terry_loss(c, r, center_coefficient=0.5)) == pytest.approx(float(bradley_terry_loss(c, r)))
    assert float(bradley_terry_loss(c + 3, r + 3, center_coefficient=0.5)) > float(bradley_terry_loss(c + 3, r + 3))


def test_calibration_bins_by_hand():
    # p = sigmoid(d): d = 0 -> 0.5, d = log 3 -> 0.75, d = -log 3 -> 0.25 (a wrongly ranked pair)
    d = torch.tensor([0.0, torch.log(torch.tensor(3.0)), -torch.log(torch.tensor(3.0))])
    mean_p, rate, count = calibration_bins(d, torch.zeros(3), n_bins=5)
    # both orders: (0.5, 1), (0.5, 0), (0.75, 1), (0.25, 0), (0.25, 1), (0.75, 0)
    assert count.tolist() == [0, 2, 2, 2, 0]
    torch.testing.assert_close(mean_p[1:4], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(rate[1:4], torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    assert torch.isnan(mean_p[0]) and torch.isnan(rate[4])
    assert expected_calibration_error(mean_p, rate, count) == pytest.approx((0.25 * 2 + 0 + 0.25 * 2) / 6)


def trl_rloo_loss(per_token_logps, old_logps, advantages, completion_mask, epsilon):
    """TRL 1.16's `RLOOTrainer._compute_loss` with the model's per-token log-probs given."""
    from trl import RLOOTrainer

    n, t = per_token_logps.shape
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=IDENTITY, aux_loss_enabled=False,
        epsilon_low=epsilon, epsilon_high=epsilon, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **kw: (per_token_logps, torch.zeros(n, t), None),
    )
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": completion_mask,
              "old_logps": old_logps, "advantages": advantages}
    return RLOOTrainer._compute_loss(trainer, None, inputs)


def test_rloo_loss_equals_trl_rloo_trainer_on_the_same_tensors():
    g = torch.Generator().manual_seed(2)
    per_token = -torch.rand(8, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(8, 5, dtype=torch.float64)
    mask[2, 3:] = 0  # a short answer
    logps = (per_token * mask).sum(1)
    old = logps + 0.3 * torch.randn(8, generator=g, dtype=torch.float64)  # off-policy enough that clipping acts
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    want = trl_rloo_loss(per_token, old, adv, mask, 0.2)
    torch.testing.assert_close(rloo_loss(logps, old, adv, 0.2), want)
    assert float(rloo_loss(logps, old, adv, 0.2)) != pytest.approx(float(-(torch.exp(logps - old) * adv).mean()))


def test_rloo_on_policy_loss_is_reinforce_and_baseline_is_leave_one_out():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    adv = rloo_advantages(rewards, 3)
    # 1 - (2 + 6)/2, 2 - (1 + 6)/2, 6 - (1 + 2)/2 ; 0 - 1.5, 0 - 1.5, 3 - 0
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    logps = torch.tensor([-3.0, -2.0, -4.0, -1.0, -5.0, -2.0], requires_grad=True)
    rloo_loss(logps, logps.detach(), adv).backward()
    torch.testing.assert_close(logps.grad, -adv / 6)  # d/dlogp of -mean(A * ratio) at ratio 1
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(rewards, 1)
