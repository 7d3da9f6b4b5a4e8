"""RLHF's third step by policy gradient: PPO and RLOO against a reward, with a KL penalty to pi_ref.

Both are `PolicyModule`s (`policy.py`: backbones, the frozen reference, the frozen reward model,
evaluation) that train on batches of prompts (`datamodules.preference.PromptDataModule`). A
training step samples answers from the policy (temperature 1), scores them with the reward the
module optimises (`reward_signal="proxy"`: the learned reward model, as in RLHF; `"gold"`: the
data module's VADER score, an oracle upper line) and takes policy-gradient steps:

- `PPOModule`: one answer per prompt; per-token rewards (the KL penalty at every token, the score
  at the last), a value head on the policy's hidden states, GAE, then `ppo_epochs` passes of
  `minibatches` clipped-surrogate steps (the math is `ppo.py`). Manual optimisation: Lightning's
  `max_steps` counts these optimiser steps (ppo_epochs * minibatches per batch of prompts).
- `RLOOModule`: `k` answers per prompt; the sequence reward minus beta * the summed per-token log
  ratio, the leave-one-out baseline of the other k - 1 answers, one clipped step per batch (TRL's
  `RLOOTrainer` loss, `objective.rloo_loss`).

Logged over training under train/: `true_reward` (gold, VADER), `proxy_reward` (the reward model),
`kl` (mean summed log ratio log pi / pi_ref of the sampled answers), `kl_coef`, the losses and
(PPO) `clipfrac`; at validation and test, `PolicyModule`'s sampled `kl`, `true_reward`,
`proxy_reward`. After fit a run that logged them at several validations draws
`plots/overoptimisation.png`: proxy and gold reward against KL over training (Gao et al. 2023).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datamodules.text import pad_rows
from datamodules.tokenizers import special_ids
from modules.align.model import hidden_and_logits, hidden_size
from modules.align.objective import rloo_advantages, rloo_loss
from modules.align.policy import PolicyModule
from modules.align.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    clipped_surrogate,
    gae,
    per_token_kl,
    token_rewards,
    value_loss,
    whiten,
)
from modules.artifacts import log_figure
from modules.finetune.model import logits_of

REWARDS = ("proxy", "gold")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t) at each answer token, its mask), each (B, T-1): position t predicts labels[t + 1]."""
    targets = labels[:, 1:]
    mask = (targets != -100).float()
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


class OnPolicyModule(PolicyModule):
    """What PPO and RLOO share: the reward they optimise, rollouts, per-token log-probs, logging."""

    def __init__(self, backbone: str | None = None, reward_signal: str = "proxy", kl_coef: float = 0.05,
                 kl_estimator: str = "k1", rollout_tokens: int | None = None, **kwargs: Any):
        super().__init__(backbone=backbone, **kwargs)
        if reward_signal not in REWARDS:
            raise ValueError(f"{type(self).__name__}.reward_signal must be one of {REWARDS}, got {reward_signal!r}")
        if reward_signal == "proxy" and self.reward_model_path is None:
            raise ValueError(f"{type(self).__name__}.reward_signal='proxy' optimises the learned reward model: set "
                             "reward_model (the reward stage's runs:/<run id>/reward/model.ckpt), or reward_signal='gold'")
        if kl_coef < 0:
            raise ValueError(f"{type(self).__name__}.kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"{type(self).__name__}.kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        self.history: list[dict[str, float]] = []  # validation points: step, kl, true_reward, proxy_reward

    def _new_tokens(self) -> int:
        dm = getattr(self._trainer, "datamodule", None)
        n = self.hparams.rollout_tokens or getattr(dm, "max_new_tokens", None)
        if n is None:
            raise ValueError(f"{type(self).__name__}: set rollout_tokens (or use a data module with max_new_tokens)")
        return n

    @torch.no_grad()
    def rollout(self, prompts: list[str], k: int) -> dict[str, Any]:
        """k answers per prompt from the policy, as right-padded rows, with their scores and reference log-probs."""
        prompt_ids = self._prompt_ids(prompts)
        seed = int(torch.randint(2**31 - 1, (1,)))
        drawn = self.sample_ids(prompt_ids, k, self._new_tokens(), 1.0, seed)
        flat_prompts = [p for p, cs in zip(prompt_ids, drawn) for _ in cs]
        flat = [c for cs in drawn for c in cs]
        _, _, pad = special_ids(self.tokenizer)
        batch = {n: t.to(self.device) for n, t in pad_rows(flat_prompts, flat, pad).items()}
        with self.as_reference() as ref:
            ref_logps, mask = token_logps(logits_of(ref, batch["input_ids"], batch["attention_mask"]), batch["labels"])
        gold = self.gold_scores(flat)
        proxy = self.proxy_scores(flat_prompts, flat) if self.reward_model is not None else None
        score = proxy if self.hparams.reward_signal == "proxy" else gold
        if score is None:
            raise ValueError(f"{type(self).__name__}.reward_signal='gold' scores with the data module's reward, and it has "
                             "none: set data.init_args.reward (e.g. vader)")
        return {**batch, "mask": mask, "ref_logps": ref_logps, "score": score.float().to(self.device),
                "gold": gold, "proxy": proxy}

    samples_per_prompt = 1

    def tokens_per_batch(self, batch: list[str]) -> int:
        """Answer tokens generated for a batch of prompts (what the throughput counts here)."""
        return len(batch) * self.samples_per_prompt * self._new_tokens()

    def _log_rollout(self, roll: dict[str, Any], kl: torch.Tensor, extra: dict[str, Any]) -> None:
        metrics = {"kl": kl.mean(), **extra}
        if roll["gold"] is not None:
            metrics["true_reward"] = roll["gold"].mean().float()
        if roll["proxy"] is not None:
            metrics["proxy_reward"] = roll["proxy"].mean().float()
        self.log_dict({f"train/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()},
                      on_step=True, batch_size=roll["input_ids"].size(0))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        m = self.trainer.callback_metrics
        if not self.trainer.sanity_checking and "val/kl" in m:
            self.history.append({"step": float(self.global_step), "kl": float(m["val/kl"]),
                                 **{k: float(m[f"val/{k}"]) for k in ("true_reward", "proxy_reward") if f"val/{k}" in m}})

    def on_train_start(self) -> None:
        self._log_now({"params/trainable": float(self.n_trainable), "finetune/lr": self.lr})

    def on_fit_end(self) -> None:
        points = [p for p in self.history if "proxy_reward" in p and "true_reward" in p]
        if len(points) >= 2 and self.trainer.is_global_zero:
            log_figure(self.loggers, overoptimisation_figure(points, type(self).__name__),
                       "plots/overoptimisation.png")


class PPOModule(OnPolicyModule):
    def __init__(
        self,
        backbone: str | None = None,
        reward_signal: str = "proxy",
        kl_coef: float = 0.05,
        target_kl: float | None = None,
        kl_horizon: int = 10_000,
        kl_estimator: str = "k1",
        ppo_epochs: int = 2,
        minibatches: int = 2,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        max_grad_norm: float = 1.0,
        rollout_tokens: int | None = None,
        **kwargs: Any,
    ):
        """PPO with a per-token KL penalty (InstructGPT's RLHF), a value head and GAE.

        Args:
            backbone: The supervised model (also pi_ref).
            reward_signal: "proxy" (the learned `reward_model`) or "gold" (the data module's reward: the oracle).
            kl_coef: Weight of the per-token KL penalty (the initial value when `target_kl` is set).
            target_kl: Adaptive KL (Ziegler et al. 2019): kl_coef moves towards this sequence KL; None: fixed.
            kl_horizon: The adaptive controller's horizon, in answers.
            kl_estimator: Per-token KL of the penalty: "k1" (log ratio, InstructGPT), "k2" or "k3".
            ppo_epochs: Passes over each batch of rollouts.
            minibatches: Minibatches per pass (optimiser steps per pass).
            clip_range: PPO's epsilon for the probability ratio.
            clip_range_value: Clip of the value head's change per batch.
            vf_coef: Weight of the value loss (the value head shares the policy's trunk).
            gamma: Discount per token.
            lam: GAE's lambda.
            whiten_advantages: Normalise advantages per batch.
            max_grad_norm: Gradient-norm clip per optimiser step (Lightning's own clipping is for
                automatic optimisation).
            rollout_tokens: Answer length of rollouts; None: the data module's `max_new_tokens`.
            **kwargs: `PolicyModule`'s arguments (reward_model, method, lr, eval_samples, ...).
        """
        super().__init__(backbone=backbone, reward_signal=reward_signal, kl_coef=kl_coef, kl_estimator=kl_estimator,
                         rollout_tokens=rollout_tokens, **kwargs)
        for name, value in (("ppo_epochs", ppo_epochs), ("minibatches", minibatches)):
            if value < 1:
                raise ValueError(f"PPOModule.{name} must be >= 1, got {value}")
        if not 0 < clip_range < 1 or clip_range_value <= 0:
            raise ValueError(f"PPOModule.clip_range must be in (0, 1) and clip_range_value > 0; got {clip_range}, "
                             f"{clip_range_value}")
        if target_kl is not None and target_kl <= 0:
            raise ValueError(f"PPOModule.target_kl must be > 0 or None (fixed kl_coef), got {target_kl}")
        self.automatic_optimization = False
        self.kl_ctl = AdaptiveKLController(kl_coef, target_kl, kl_horizon)
        self.value_head: nn.Linear | None = None

    def _build(self) -> None:
        super()._build()
        self.value_head = nn.Linear(hidden_size(self.backbone), 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)

    def logps_and_values(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(y_t), V(s_t)), each (B, T-1): the value of the state before each answer token."""
        h, logits = hidden_and_logits(self.backbone, batch["input_ids"], batch["attention_mask"])
        logps, mask = token_logps(logits, batch["labels"])
        values = self.value_head(h[:, :-1].float()).squeeze(-1) * mask
        return logps, values

    def training_step(self, batch: list[str], batch_idx: int) -> None:
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        # 1. Rollout: answers, their score, and log-probs and values before any update
        roll = self.rollout(batch, 1)
        mask = roll["mask"]
        with torch.no_grad():
            old_logps, old_values = self.logps_and_values(roll)
            kl = per_token_kl(old_logps, roll["ref_logps"], h.kl_estimator) * mask
            # 2. Rewards per token, then GAE (ppo.py)
            rewards = token_rewards(roll["score"], kl, mask, self.kl_ctl.value)
            advantages, returns = gae(rewards, old_values, mask, h.gamma, h.lam)
            if h.whiten_advantages:
                advantages = whiten(advantages, mask)
        # 3. ppo_epochs passes of clipped steps over minibatches
        n = mask.size(0)
        stats = []
        for _ in range(h.ppo_epochs):
            for idx in torch.randperm(n, device=mask.device).chunk(h.minibatches):
                mb = {k: roll[k][idx] for k in ("input_ids", "attention_mask", "labels")}
                logps, values = self.logps_and_values(mb)
                pg, clipfrac = clipped_surrogate(logps, old_logps[idx], advantages[idx], mask[idx], h.clip_range)
                vl = value_loss(values, old_values[idx], returns[idx], mask[idx], h.clip_range_value)
                loss = pg + h.vf_coef * vl
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
                stats.append(torch.stack([pg.detach(), vl.detach(), clipfrac.detach()]))
        seq_kl = (per_token_kl(old_logps, roll["ref_logps"], "k1") * mask).sum(1)
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(float(seq_kl.mean()), n)  # 4. the adaptive penalty follows the KL
        pg, vl, clipfrac = torch.stack(stats).mean(0)
        self._log_rollout(roll, seq_kl, {"policy_loss": pg, "value_loss": vl, "clipfrac": clipfrac,
                                         "kl_coef": kl_coef, "score": roll["score"].mean()})


class RLOOModule(OnPolicyModule):
    def __init__(self, backbone: str | None = None, reward_signal: str = "proxy", kl_coef: float = 0.05, k: int = 4,
                 epsilon: float = 0.2, normalize_advantages: bool = False, rollout_tokens: int | None = None,
                 **kwargs: Any):
        """REINFORCE leave-one-out (Ahmadian et al. 2024), TRL's `RLOOTrainer` objective.

        Args:
            backbone: The supervised model (also pi_ref).
            reward_signal: "proxy" (the learned `reward_model`) or "gold" (the data module's reward: the oracle).
            kl_coef: TRL's beta: the sequence reward is score - beta * sum_t log pi / pi_ref.
            k: Answers per prompt (TRL's num_generations), >= 2.
            epsilon: Clip of the sequence ratio (inactive on-policy: one step per batch).
            normalize_advantages: Whiten the advantages per batch (TRL's `normalize_advantages`).
            rollout_tokens: Answer length of rollouts; None: the data module's `max_new_tokens`.
            **kwargs: `PolicyModule`'s arguments (reward_model, method, lr, eval_samples, ...).
        """
        super().__init__(backbone=backbone, reward_signal=reward_signal, kl_coef=kl_coef, rollout_tokens=rollout_tokens, **kwargs)
        if k < 2:
            raise ValueError(f"RLOOModule.k must be >= 2 (the leave-one-out baseline needs another answer), got {k}")
        self.samples_per_prompt = k

    def training_step(self, batch: list[str], batch_idx: int) -> torch.Tensor:
        h = self.hparams
        roll = self.rollout(batch, h.k)
        mask = roll["mask"]
        logits = self(roll["input_ids"], roll["attention_mask"])
        logps_tok, _ = token_logps(logits, roll["labels"])
        kl = ((logps_tok.detach() - roll["ref_logps"]) * mask).sum(1)  # TRL: first-order log ratio, summed
        rewards = roll["score"] - h.kl_coef * kl
        advantages = rloo_advantages(rewards, h.k)
        if h.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
        logps = (logps_tok * mask).sum(1)
        loss = rloo_loss(logps, logps.detach(), advantages, h.epsilon)
        self._log_rollout(roll, kl, {"loss": loss.detach(), "kl_coef": h.kl_coef, "score": roll["score"].mean()})
        return loss


def overoptimisation_figure(points: list[dict[str, float]], title: str):
    """Proxy and gold reward of one run's validation samples against their KL to pi_ref."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = [p["kl"] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(kl, [p["proxy_reward"] for p in points], "o-", label="proxy reward (reward model)")
    ax2 = ax.twinx()
    ax2.plot(kl, [p["true_reward"] for p in points], "s-", color="C1", label="gold reward (VADER)")
    ax.set_xlabel("KL(pi || pi_ref), nats per answer")
    ax.set_ylabel("proxy reward", color="C0")
    ax2.set_ylabel("gold reward", color="C1")
    ax.set_title(f"{title}: reward over-optimisation")
    ax.legend(ax.get_lines() + ax2.get_lines(), [line.get_label() for line in ax.get_lines() + ax2.get_lines()],
              loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig
