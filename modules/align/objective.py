"""The mathematics of preference learning, apart from any training loop: DPO, the reward model's
Bradley-Terry loss and its calibration, and RLOO's leave-one-out policy gradient (PPO: `ppo.py`).

DPO (Rafailov et al. 2023) fine-tunes a policy pi on pairs (x, y_w, y_l), y_w preferred to y_l,
against a frozen reference pi_ref (the supervised model). Its implicit reward is
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (eq. 5, up to a term in x alone), and its loss is the
Bradley-Terry likelihood of the preferences under that reward (eq. 7). beta is the strength of the
KL penalty of the RLHF objective DPO solves in closed form: large beta keeps pi near pi_ref.

No lightning import here: `module.py` trains with these, tests check them against TRL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datamodules.text import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per sequence: the summed log-probabilities of the labelled tokens.

    logits: (B, T, V); labels: (B, T) aligned with the inputs (Hugging Face convention), -100 on
    the prompt and padding. Position t predicts labels[t + 1]. Returns (B,).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(-1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss (eq. 7) and the implicit rewards of the chosen and rejected answers, each (B,).

    L = -log sigmoid(beta * [log pi/pi_ref (y_w|x) - log pi/pi_ref (y_l|x)]). At the start, where
    pi = pi_ref, both rewards are 0 and the loss is log 2.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # r(x, y_w), eq. 5
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # r(x, y_l)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics of a batch, under TRL's names (means over the pairs)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def sampled_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo KL(pi || pi_ref) per sequence from samples y ~ pi: mean of log pi(y) - log pi_ref(y).

    Unbiased only when the samples come from pi itself (temperature 1, no top-k), which is how the
    module draws them. The DPO paper's reward-KL frontier (fig. 2) uses this sequence-level KL.
    """
    return (policy_logps - ref_logps).mean()


def best_of_n_kl(n: int) -> float:
    """KL of best-of-n sampling from its sampling policy: log n - (n - 1) / n (an upper bound that
    is tight for continuous rewards; Stiennon et al. 2020, appendix G.3)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------- the reward model (RLHF step 2)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """The reward model's loss: -log sigmoid(r(x, y_w) - r(x, y_l)), the Bradley-Terry likelihood of
    the preferences (InstructGPT, Ouyang et al. 2022, eq. 1; TRL's `RewardTrainer`).

    `margin` (B,) is subtracted from the difference (Llama 2's margin loss, Touvron et al. 2023,
    eq. 2); `center_coefficient` adds c * mean((r_w + r_l)^2), which pins the rewards' mean near 0
    (Eisenstein et al. 2023, eq. 2): Bradley-Terry alone is blind to a shift of every reward.
    DPO's loss is this one with r = beta * log pi / pi_ref.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's `RewardTrainer` metrics of a batch, under its names."""
    every = torch.cat([chosen_rewards, rejected_rewards]).detach()
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).detach().mean(),
        "mean_reward": every.mean(),
        "min_reward": every.min(),
        "max_reward": every.max(),
    }


def calibration_bins(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                     n_bins: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reliability of P(y_w > y_l) = sigmoid(r_w - r_l): per equal-width bin of predicted
    probability, (mean predicted, observed rate, count), each (n_bins,) (NaN where a bin is empty).

    Each pair is read in both orders, (p, 1) and (1 - p, 0), so the observed rate is the share of
    pairs in the bin whose first answer is the labelled winner: a calibrated model lies on the diagonal.
    """
    p = torch.sigmoid((chosen_rewards - rejected_rewards).double())
    prob = torch.cat([p, 1 - p])
    won = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    idx = (prob * n_bins).long().clamp_(max=n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    mean_p = torch.bincount(idx, prob, minlength=n_bins) / count
    rate = torch.bincount(idx, won, minlength=n_bins) / count
    return mean_p, rate, count


def expected_calibration_error(mean_p: torch.Tensor, rate: torch.Tensor, count: torch.Tensor) -> float:
    """ECE: the count-weighted mean |predicted - observed| over non-empty bins."""
    seen = count > 0
    return float(((mean_p - rate).abs()[seen] * count[seen]).sum() / count[seen].sum())


# ---------------------------------------------------------------------- RLOO (RLHF step 3, the simpler policy gradient)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, eq. 4; Kool et al. 2019).

    rewards: (P * k,) prompt-major, k samples per prompt (already KL-penalised). Each sample's
    baseline is the mean reward of the other k - 1 samples of its prompt: unbiased, no value head.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt for a leave-one-out baseline, got {k}")
    r = rewards.view(-1, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              epsilon_low: float = 0.2, epsilon_high: float | None = None) -> torch.Tensor:
    """TRL's RLOO policy loss on sequence log-probabilities (N,): a PPO-style clipped surrogate on
    the sequence ratio pi / pi_old; on-policy (one step per batch) it is REINFORCE's
    -A * log pi(y|x) in value and gradient."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + (epsilon_low if epsilon_high is None else epsilon_high))
    return -torch.min(ratio * advantages, clipped * advantages).mean()
