"""What the language-model projects' LightningModules share: the learning-rate schedule and the
logging of an evaluated loss.

`GPTModule` (pretraining) and `FinetuneModule` (fine-tuning, and DPO through it) both warm up
linearly and decay along a cosine (the mini-GPT may instead hold its peak and decay only at the end,
`wsd_lr`), and both log a token-weighted mean loss with its perplexity.
One copy here keeps the two from drifting apart. No lightning import: a module passes itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import MeanMetric


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """nanoGPT's schedule (its `get_lr`): linear warm-up to lr, cosine decay to min_lr at
    decay_steps, then flat.

    Warm-up is (step + 1) / (warmup_steps + 1) of lr, so step 0 already moves the weights and
    the peak is reached at step warmup_steps, where the cosine starts.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def wsd_lr(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, cooldown_frac: float) -> float:
    """Warm-up, stable, decay (Zhai et al. 2022; Hu et al. 2024, MiniCPM; the modded-nanogpt
    speedrun): the same linear warm-up as `cosine_lr`, then lr held flat, then a linear cool-down
    to min_lr over the last cooldown_frac of the decay_steps, then flat at min_lr.

    Holding the peak longer moves the weights further; the final cool-down harvests the loss that
    the high rate kept them from settling into.
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    start = max(warmup_steps, decay_steps - round(cooldown_frac * decay_steps))
    if step < start:
        return lr
    if step >= decay_steps:
        return min_lr
    return lr - (lr - min_lr) * (step - start) / max(1, decay_steps - start)


SCHEDULES = ("cosine", "wsd")


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int,
                    min_ratio: float) -> dict[str, Any]:
    """`lr_schedule` with nanoGPT's cosine."""
    return lr_schedule(optimizer, warmup_steps, decay_steps, min_ratio)


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int,
                min_ratio: float, kind: str = "cosine", cooldown_frac: float = 0.4) -> dict[str, Any]:
    """`cosine_lr` (or, kind="wsd", `wsd_lr`) on every parameter group of `optimizer`, stepped per
    optimizer step, as the `lr_scheduler` entry Lightning's `configure_optimizers` returns. The peak
    is each group's `lr` (a composite optimizer's groups each keep their own); the floor is
    min_ratio of it. A run shorter than its warm-up never leaves it."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {kind!r}")
    if not 0.0 <= cooldown_frac <= 1.0:
        raise ValueError(f"cooldown_frac must be in [0, 1] (the share of decay_steps spent cooling down), got {cooldown_frac}")
    if kind == "wsd":
        factor = lambda s: wsd_lr(s, 1.0, min_ratio, warmup_steps, decay_steps, cooldown_frac)  # noqa: E731
    else:
        factor = lambda s: cosine_lr(s, 1.0, min_ratio, warmup_steps, decay_steps)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": sched, "interval": "step"}


def log_mean_loss(module: Any, split: str, metric: MeanMetric) -> torch.Tensor:
    """Log `split/loss` and `split/ppl` from a MeanMetric of losses weighted by their token
    counts, then reset it; returns the loss.

    `metric.compute()` already reduces across processes (torchmetrics syncs its sum and weight
    states), so the values are logged with sync_dist=False: a second reduction would average
    the same number again, and cost a collective per key.
    """
    loss = metric.compute()
    metric.reset()
    module.log(f"{split}/loss", loss, sync_dist=False)
    module.log(f"{split}/ppl", torch.exp(loss), sync_dist=False)
    return loss
