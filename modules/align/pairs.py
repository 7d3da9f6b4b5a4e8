"""The pairs stage: preference pairs sampled from the supervised model and labelled by the reward.

`PairSampler` is run like any project (``practicum run configs/align/pairs_minigpt.yaml``, or as a
study stage) with ``trainer.max_steps: 0``: when the fit starts it samples `samples_per_prompt`
continuations of every prompt of its `PromptDataModule` from the backbone (the supervised model,
temperature `temperature`), scores them with the data module's reward (VADER), keeps each prompt's
best and worst (`datamodules.preference.best_and_worst`), or with ``train_pairs: all`` every
comparison of its training prompts' samples (`all_pairs`; held-out prompts keep one pair each, so
that held-out accuracy counts independent pairs), and writes them, with their split and scores, to
the run's artifact ``pairs/pairs.jsonl``. `PreferenceDataModule` reads that file
(``runs:/<run id>/pairs/pairs.jsonl``); no datamodule samples from the model it feeds.

Logged: `pairs/<split>` (pairs with a reward gap, ties excluded) and `pairs/mean_gap` (the mean
score gap over the training rows, a tied prompt counting 0).
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L

from datamodules.preference import all_pairs, best_and_worst
from modules.align.policy import PolicyModule
from modules.artifacts import log_text

PAIRS_ARTIFACT = "pairs/pairs.jsonl"


class PairSampler(PolicyModule):
    def __init__(self, backbone: str | None = None, samples_per_prompt: int = 4, temperature: float = 1.0,
                 sample_seed: int = 0, train_pairs: str = "best_worst", **kwargs: Any):
        """Sample, label and write preference pairs when the fit starts (run it with max_steps 0).

        Args:
            backbone: The supervised model to sample from (``runs:/<run id>`` of the SFT run).
            samples_per_prompt: Continuations per prompt (>= 2); the best and the worst make the pair.
            temperature: Sampling temperature of the continuations.
            sample_seed: Seed of the samples.
            train_pairs: "best_worst" (one pair per training prompt) or "all" (every comparison of its
                samples with a score gap: up to K(K-1)/2 per prompt for K samples).
            **kwargs: The other `PolicyModule` arguments (sample_batch_size, ...).
        """
        super().__init__(backbone=backbone, **kwargs)
        if samples_per_prompt < 2:
            raise ValueError(f"PairSampler.samples_per_prompt must be >= 2 (a pair), got {samples_per_prompt}")
        if temperature <= 0:
            raise ValueError(f"PairSampler.temperature must be > 0 (greedy samples are all alike), got {temperature}")
        if train_pairs not in ("best_worst", "all"):
            raise ValueError(f"PairSampler.train_pairs must be 'best_worst' or 'all', got {train_pairs!r}")
        self.rows: list[dict[str, Any]] = []

    # the stage trains and tests nothing: its batches are prompts, which FinetuneModule's steps cannot
    # score; Lightning's own (empty) hooks tell the pipeline there is no test to run
    validation_step = L.LightningModule.validation_step
    test_step = L.LightningModule.test_step

    def build_pairs(self, dm) -> list[dict[str, Any]]:
        """{split, prompt, chosen, rejected, score_chosen, score_rejected} rows for every prompt of `dm`."""
        if getattr(dm, "reward", None) is None:
            raise ValueError("PairSampler labels pairs with the data module's reward: set data.init_args.reward")
        h, rows = self.hparams, []
        for i, (split, prompts) in enumerate(dm.prompts.items()):
            samples = self.sample_completions(prompts, h.samples_per_prompt, dm.max_new_tokens, h.temperature,
                                              seed=h.sample_seed * 1000 + i, reference=True)
            scores = dm.reward([c for cs in samples for c in cs])
            pick = all_pairs if split == "train" and h.train_pairs == "all" else best_and_worst
            rows += [{"split": split, **r} for r in pick(prompts, samples, scores)]
        return rows

    def on_fit_start(self) -> None:
        self.rows = self.build_pairs(self.trainer.datamodule)
        metrics = {f"pairs/{s}": float(sum(r["split"] == s and r["score_chosen"] > r["score_rejected"]
                                           for r in self.rows)) for s in ("train", "val", "test")}
        gaps = [r["score_chosen"] - r["score_rejected"] for r in self.rows if r["split"] == "train"]
        metrics["pairs/mean_gap"] = sum(gaps) / max(len(gaps), 1)
        if self.trainer.is_global_zero:
            log_text(self.loggers, "".join(json.dumps(r) + "\n" for r in self.rows), PAIRS_ARTIFACT)
            self._log_now(metrics)
