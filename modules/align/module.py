"""Direct Preference Optimisation of a causal LM: the mini-GPT or a Hugging Face model.

`DPOModule` is a `PolicyModule` (`policy.py`: backbones, the reference, sampled `kl`,
`true_reward` and `proxy_reward` at evaluation) whose objective is DPO's (`objective.py`) on
batches of preference pairs (`datamodules.preference.PreferenceDataModule`).

Logged, per split (train/val/test), under TRL's names: `loss` (the DPO loss, log 2 at step 0),
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
`logps/rejected`; `kl` and `true_reward` are the two axes of the DPO paper's reward-KL frontier.
"""

from __future__ import annotations

from typing import Any

import torch

from modules.align.objective import dpo_loss, preference_metrics
from modules.align.policy import PolicyModule


class DPOModule(PolicyModule):
    def __init__(self, backbone: str | None = None, method: str = "full", beta: float = 0.1, **kwargs: Any):
        """DPO on preference pairs, against the backbone as loaded (the supervised model).

        Args:
            backbone: As for `PolicyModule`.
            method: As for `PolicyModule`.
            beta: DPO's beta, the weight of the KL penalty: larger keeps the policy nearer the reference.
            **kwargs: The other `PolicyModule` arguments (best_of, eval_samples, reward_model, lr, r, ...).
        """
        super().__init__(backbone=backbone, method=method, **kwargs)
        if beta <= 0:
            raise ValueError(f"DPOModule.beta must be > 0 (the KL penalty weight; DPO uses 0.01..1), got {beta}")
        self.beta = beta

    # ------------------------------------------------------------------ the objective

    def _pair_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss and metrics of a batch whose first half holds the chosen answers, second the rejected."""
        logps = self._logps(self.backbone, batch)
        with torch.no_grad(), self.as_reference() as ref:
            ref_logps = self._logps(ref, batch)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        metrics = {"loss": loss.detach(), **preference_metrics(r_chosen, r_rejected),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        return loss, metrics

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        loss, _ = self._pair_step(batch)  # FinetuneModule.evaluate (val/loss_before) averages this
        return loss, batch["input_ids"].size(0) // 2

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._pair_step(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, prog_bar=False,
                      batch_size=batch["input_ids"].size(0) // 2)
        return loss

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        _, metrics = self._pair_step(batch)
        self.log_dict({f"{split}/{k}": v for k, v in metrics.items()}, on_epoch=True, sync_dist=True,
                      batch_size=batch["input_ids"].size(0) // 2)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_train_start(self) -> None:
        metrics = {"params/trainable": float(self.n_trainable), "finetune/lr": self.lr, "dpo/beta": self.beta}
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_dataloader") and self.trainer.limit_val_batches != 0:
            metrics["val/loss_before"] = self.evaluate(dm.val_dataloader())  # log 2: pi = pi_ref
        self._log_now(metrics)
