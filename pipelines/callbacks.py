"""The callbacks every run gets, whatever its project: a NaN guard, the resource ledger, checkpoints;
and a study's progress line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from pipelines.checkpoint import CheckpointInfo
from pipelines.resources import ResourceMonitor


class NaNGuard(Callback):
    """Stops at the first non-finite loss, before backward can write NaN into the weights or a checkpoint."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"loss is {loss.item()} at step {trainer.global_step}: training stopped before the update; the last "
                "good checkpoint is kept. Lower the learning rate, clip gradients, or check the data."
            )


class BestCheckpoint(ModelCheckpoint):
    """Best by ``monitor`` when the module logs it, else simply the latest: no project has to declare one."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor and self.monitor not in trainer.callback_metrics:
            self.monitor = None
        super().on_validation_end(trainer, pl_module)


def pipeline_callbacks(ckpt_dir: Path, info: dict[str, Any], monitor: str | None, mode: str,
                       every_n_steps: int | None, checkpointing: bool = True) -> list[Callback]:
    """NaNGuard, ResourceMonitor, on_exception.ckpt, the checkpoint's ``practicum`` entry and, unless
    `checkpointing` is off (trainer.enable_checkpointing=false), best.ckpt and last.ckpt (also every
    `every_n_steps` steps)."""
    # on_exception.ckpt comes after best/last: Trainer.checkpoint_callback is the first checkpoint callback
    tail: list[Callback] = [OnExceptionCheckpoint(ckpt_dir, filename="on_exception"), CheckpointInfo(info)]
    if not checkpointing:
        return [NaNGuard(), ResourceMonitor(), *tail]
    best = BestCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode,
                          auto_insert_metric_name=False, enable_version_counter=False)
    # Lightning writes checkpoints atomically (temporary file, then rename): a kill mid-save
    # leaves the previous last.ckpt intact.
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False, every_n_train_steps=every_n_steps)
    return [NaNGuard(), ResourceMonitor(), best, last, *tail]


class ProgressLine(Callback):
    """Feeds one study-wide bar: the variant and seed running, its step of max_steps and the primary metric.

    The bar itself (`tqdm`) counts runs and shows elapsed and remaining time; this only sets its postfix,
    at most a few times a second.
    """

    def __init__(self, bar, label: str, metric: str, every_s: float = 0.5):
        self.bar, self.label, self.metric, self.every_s = bar, label, metric, every_s
        self._last = 0.0

    def _update(self, trainer, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        step = f"step {trainer.global_step}" + (f"/{total}" if total else "")
        value = trainer.callback_metrics.get(self.metric)
        shown = f" {self.metric} {float(value):.4g}" if value is not None and value.numel() == 1 else ""
        self.bar.set_postfix_str(f"{self.label} {step}{shown}", refresh=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._update(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._update(trainer, force=True)
