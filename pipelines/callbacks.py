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


def validates_after_this_batch(trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended (asked from
    ``on_train_batch_end``): the loop's own decision, so it holds for step and epoch schedules alike."""
    if not trainer.enable_validation:
        return False
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt: at each validation, every `every_n_steps` steps and at least every `every_minutes`.

    A periodic save that falls on a step after which Lightning validates is written after that
    validation, not before it. Lightning resumes a checkpoint written at the end of a training batch
    as "this batch and its validation are done" and skips that validation; written after it, the
    file says exactly what happened, and a resumed run validates, samples and logs on the steps an
    uninterrupted run does.

    Args:
        every_minutes: also save when this many minutes have passed since the last save (None: off).
    """

    def __init__(self, *args, every_minutes: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.every_s = every_minutes * 60 if every_minutes else None
        self._saved_at = time.monotonic()
        self._after_validation = False

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self._every_n_train_steps
        due = bool(n) and trainer.global_step % n == 0
        if self.every_s is not None:  # every rank takes rank 0's decision (clocks differ)
            due = trainer.strategy.broadcast(due or time.monotonic() - self._saved_at >= self.every_s)
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        if validates_after_this_batch(trainer):
            # Lightning 2.6 resumes a file written after an epoch-closing validation an epoch (saved
            # during it) or a logging step (saved at the epoch's end) off: that save waits for the
            # next due step instead
            self._after_validation = not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            if self._last_global_step_saved != trainer.global_step:
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def pipeline_callbacks(ckpt_dir: Path, info: dict[str, Any], monitor: str | None, mode: str,
                       every_n_steps: int | None, checkpointing: bool = True,
                       every_minutes: float | None = None) -> list[Callback]:
    """NaNGuard, ResourceMonitor, on_exception.ckpt, the checkpoint's ``practicum`` entry and, unless
    `checkpointing` is off (trainer.enable_checkpointing=false), best.ckpt and last.ckpt (also every
    `every_n_steps` steps and `every_minutes` minutes)."""
    # on_exception.ckpt comes after best/last: Trainer.checkpoint_callback is the first checkpoint callback
    tail: list[Callback] = [OnExceptionCheckpoint(ckpt_dir, filename="on_exception"), CheckpointInfo(info)]
    if not checkpointing:
        return [NaNGuard(), ResourceMonitor(), *tail]
    best = BestCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode,
                          auto_insert_metric_name=False, enable_version_counter=False)
    # Lightning writes checkpoints atomically (temporary file, then rename): a kill mid-save
    # leaves the previous last.ckpt intact.
    last = LastCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
                          every_n_train_steps=every_n_steps, every_minutes=every_minutes)
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
