"""Proximal Policy Optimisation for language models, the taught core: no training loop here.

RLHF's third step as InstructGPT runs it (Ouyang et al. 2022; Ziegler et al. 2019; Stiennon et al.
2020): sample an answer y to a prompt x from the policy pi, score it with the reward model, and
raise the reward while a KL penalty keeps pi near the supervised pi_ref. Each generated token is
an action; the state is the prompt and the tokens so far. Tensors are (B, T): B sampled answers,
T answer positions, `mask` 1 on real answer tokens.

1. `per_token_kl`: log pi(y_t) - log pi_ref(y_t) at each sampled token (or Schulman's k2, k3).
2. `token_rewards`: r_t = -kl_coef * KL_t at every token, plus the reward model's score at the last.
3. `gae`: advantages by Generalised Advantage Estimation (Schulman et al. 2016, eq. 16) from the
   rewards and the value head's V(s_t); returns = advantages + values are the value targets.
4. `clipped_surrogate`: PPO's clipped policy loss (Schulman et al. 2017, eq. 7) and `value_loss`,
   the clipped value loss of the OpenAI baselines.
5. `AdaptiveKLController`: kl_coef moves towards a target KL (Ziegler et al. 2019, eq. 2).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (advantages are whitened per batch)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """A per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating
    KL divergence"). With log r = log pi_ref - log pi:
    k1 = -log r (unbiased, can be negative per token), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = (r - 1) - log r (unbiased, >= 0). All three are exactly 0 where pi = pi_ref.
    """
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t, and the sequence's score (B,) added at its last real token."""
    rewards = -kl_coef * kl * mask
    last = mask.long().cumsum(1).argmax(1)  # the last position where mask is 1
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += score.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), by the backward recursion

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lam * A_{t+1},

    with V = 0 and A = 0 after the last real token (the episode ends there). returns = A + V.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # a padded position passes nothing back: the next real step sees V = A = 0
        next_value = values[:, t] * m
        next_adv = adv * m
    return advantages, advantages + values


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(PPO's policy loss, the share of tokens where the clip was active).

    L = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],  rho_t = pi(y_t) / pi_old(y_t).
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> torch.Tensor:
    """0.5 * E_t[max((V - R)^2, (clip(V, V_old +- eps) - R)^2)]: the value head moves at most eps per batch."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019).

    The penalty grows while the policy's KL to the reference exceeds the target and shrinks below it.
    `target=None` keeps kl_coef fixed.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
