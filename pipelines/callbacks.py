"""The callbacks every run gets, whatever its project: a NaN guard, the resource ledger, checkpoints."""

from __future__ import annotations

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
