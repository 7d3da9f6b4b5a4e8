"""The mathematics of Direct Preference Optimisation, apart from any training loop.

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
