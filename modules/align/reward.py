"""RLHF's second step: a reward model trained to predict which of two answers is preferred.

`RewardModule` is a `FinetuneModule` (the same backbones, LoRA, optimiser and schedule) whose model
is `model.RewardModel`: the supervised mini-GPT with a scalar head on its last real token (or on
every token, summed: `pooling="sum"`). It
trains on the preference pairs of `datamodules.preference.PreferenceDataModule` with the
Bradley-Terry loss (`objective.bradley_terry_loss`, TRL's `RewardTrainer` loss).

Logged per split under TRL's names: `loss`, `accuracy` (the share of pairs where the model ranks
the VADER-preferred answer higher: held-out agreement with the labeller), `margin` (mean
r_w - r_l), `mean_reward`, `min_reward`, `max_reward`; at the end of validation and test,
`calibration_ece`, `pairs` (how many pairs `accuracy` is over) and, for the test split, the
reliability plot `reward/calibration_test.png` (predicted P(y_w > y_l) against the observed rate, in
bins). After fit the model is written to
the artifact ``reward/model.ckpt`` (a mini-GPT checkpoint with the head beside it), which the
policy modules load as their `reward_model`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modules.align.model import POOLINGS, RewardModel
from modules.align.objective import (
    bradley_terry_loss,
    calibration_bins,
    expected_calibration_error,
    reward_metrics,
)
from modules.artifacts import log_figure, log_file
from modules.finetune.model import MiniGPTForCausalLM
from modules.finetune.module import FinetuneModule

REWARD_ARTIFACT = "reward/model.ckpt"


class RewardModule(FinetuneModule):
    def __init__(self, backbone: str | None = None, method: str = "full", pooling: str = "last",
                 center_rewards_coefficient: float | None = None, calibration_bins: int = 10, export: bool = True,
                 **kwargs: Any):
        """A scalar-head reward model on the backbone, trained on preference pairs.

        Args:
            backbone: As for `FinetuneModule`: the supervised mini-GPT (``runs:/<run id>``).
            method: "full" or "lora" (the head is always trained in full).
            pooling: "last" (the head on the last real token, InstructGPT's) or "sum" (every token
                scored, the scores summed): `modules.align.model.RewardModel`.
            center_rewards_coefficient: TRL's `center_rewards_coefficient`: adds c * mean((r_w + r_l)^2)
                to pin the rewards' mean near 0; None: the plain Bradley-Terry loss.
            calibration_bins: Equal-width bins of predicted probability for the calibration.
            export: Write and log ``reward/model.ckpt`` after fit (the policy modules read it).
            **kwargs: The other `FinetuneModule` arguments (lr, warmup_steps, r, ...).
        """
        super().__init__(backbone=backbone, method=method, export=export, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"RewardModule.pooling must be one of {POOLINGS}, got {pooling!r}")
        if calibration_bins < 2:
            raise ValueError(f"RewardModule.calibration_bins must be >= 2, got {calibration_bins}")
        self.center = center_rewards_coefficient
        self.head: nn.Linear | None = None
        self._seen: dict[str, list[torch.Tensor]] = {}

    def _build(self) -> None:
        super()._build()
        self.head = RewardModel(self.backbone).head  # a new head, sized to the backbone
        self.n_total += sum(p.numel() for p in self.head.parameters())
        self.n_trainable += sum(p.numel() for p in self.head.parameters())

    @property
    def reward_model(self) -> RewardModel:
        self.configure_model()
        return RewardModel(self.backbone, self.head, self.hparams.pooling)

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r(x, y_w), r(x, y_l)), each (B,), of a batch of B chosen rows then B rejected rows."""
        return self.reward_model(batch["input_ids"], batch["attention_mask"]).chunk(2)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        chosen, rejected = self.rewards(batch)
        return bradley_terry_loss(chosen, rejected, center_coefficient=self.center), chosen.numel()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, center_coefficient=self.center)
        metrics = {"loss": loss.detach(), **reward_metrics(chosen, rejected)}
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=chosen.numel())
        return loss

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        chosen, rejected = self.rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, center_coefficient=self.center)
        metrics = {"loss": loss, **reward_metrics(chosen, rejected)}
        self.log_dict({f"{split}/{k}": v for k, v in metrics.items()}, on_epoch=True, batch_size=chosen.numel())
        self._seen.setdefault(split, []).append(torch.stack([chosen, rejected]).detach().cpu())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _calibration(self, split: str) -> None:
        seen = self._seen.pop(split, [])
        if not seen:
            return
        chosen, rejected = torch.cat(seen, dim=1)
        mean_p, rate, count = calibration_bins(chosen, rejected, self.hparams.calibration_bins)
        self.log(f"{split}/calibration_ece", expected_calibration_error(mean_p, rate, count))
        self.log(f"{split}/pairs", float(chosen.numel()))  # what `accuracy` is a proportion of (a study's bars)
        if split == "test" and self.trainer.is_global_zero:
            log_figure(self.loggers, calibration_figure(mean_p, rate, count), "reward/calibration_test.png")

    def on_validation_epoch_end(self) -> None:
        self._calibration("val")

    def on_test_epoch_end(self) -> None:
        self._calibration("test")

    def on_train_start(self) -> None:
        self._log_now({"params/trainable": float(self.n_trainable), "finetune/lr": self.lr})

    def on_train_end(self) -> None:
        if not self.export or self.trainer.global_rank != 0:
            return
        if self.kind != "minigpt":
            raise ValueError("RewardModule exports mini-GPT reward models only; set export: false for a Hugging Face "
                             "backbone")
        with tempfile.TemporaryDirectory() as tmp:
            path = self.save_merged(Path(self.export_dir or tmp)) / "model.ckpt"  # adapters folded in: a mini-GPT
            attach_head(path, self.head, self.hparams.pooling)
            log_file(self.loggers, path, "reward")


def calibration_figure(mean_p: torch.Tensor, rate: torch.Tensor, count: torch.Tensor):
    """The reliability diagram: observed rate against predicted probability, the diagonal for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    seen = count > 0
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    ax.plot(mean_p[seen].numpy(), rate[seen].numpy(), "o-", label="reward model")
    for p, r, n in zip(mean_p[seen].tolist(), rate[seen].tolist(), count[seen].tolist()):
        ax.annotate(str(int(n)), (p, r), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("predicted P(first answer preferred)")
    ax.set_ylabel("observed rate (VADER labels)")
    ax.set_title(f"Reward model calibration (ECE {expected_calibration_error(mean_p, rate, count):.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def attach_head(path: Path, head: nn.Linear, pooling: str = "last") -> Path:
    """Add the reward head and its pooling to a mini-GPT checkpoint, under "reward_head" and
    "reward_pooling" (a backbone loader ignores both)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["reward_head"] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    checkpoint["reward_pooling"] = pooling
    torch.save(checkpoint, path)
    return path


def load_reward_model(path: str | Path) -> tuple[RewardModel, Any]:
    """(the frozen reward model in eval mode, its tokenizer) from `save_reward_model`'s file."""
    from modules.finetune.backbone import load_minigpt, load_tokenizer

    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint.get("reward_head")
    if state is None:
        raise ValueError(f"{path} holds no reward head: give the reward stage's runs:/<run id>/{REWARD_ARTIFACT} "
                         "(written by modules.align.reward.RewardModule)")
    head = nn.Linear(state["weight"].size(1), 1)
    head.load_state_dict(state)
    model = RewardModel(MiniGPTForCausalLM(load_minigpt(str(path)), name_or_path=str(path)), head,
                        checkpoint.get("reward_pooling", "last"))
    return model.requires_grad_(False).eval(), load_tokenizer("minigpt", str(path))
