"""TimeToTarget: the steps and training time a run takes to first reach a target validation metric.

A speedrun is judged by its time to a target loss, not by its loss at a fixed step. This callback
watches one logged metric at every validation and logs, once, when it first reaches the target:

    target/steps    optimizer steps taken by then
    target/time_s   training seconds by then, validation excluded (its cost depends on the split's
                    size and the validation cadence, not on the recipe)
    target/reached  1.0, or 0.0 at the end of a run that never got there (which then has no
                    target/steps or target/time_s: a study's table shows them as missing)
    target/steps_at_least, target/time_s_at_least
                    at the end of a run that never got there: its whole training, a lower bound on
                    the time it would have taken (a censored time). A study's claims read a bound
                    where it can only understate their case (`pipelines.verdicts`, "censored").

The resolution is the validation cadence (`val_check_interval`). Any project can use it from its
config::

    trainer:
      callbacks:
        - class_path: modules.targets.TimeToTarget
          init_args: {target: 1.92, monitor: val/loss}
"""

from __future__ import annotations

import time

from lightning import Callback


class TimeToTarget(Callback):
    """Args:
        target: The value to reach.
        monitor: The logged metric to watch (at validation).
        mode: "min" (reached at or below the target) or "max" (at or above).
    """

    def __init__(self, target: float, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"TimeToTarget mode must be 'min' or 'max', got {mode!r}")
        self.target, self.monitor, self.mode = float(target), monitor, mode
        self.reached_at: tuple[int, float] | None = None  # (steps, training seconds)
        self._train_s = 0.0
        self._since: float | None = None

    # training time: the clock runs from fit start and pauses during validation
    def on_train_start(self, trainer, pl_module) -> None:
        self._since = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._since is not None:
            self._train_s += time.perf_counter() - self._since
            self._since = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self.reached_at is None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ValueError(f"TimeToTarget watches {self.monitor!r}, which the module does not log at "
                                 f"validation; logged: {sorted(trainer.callback_metrics)}")
            value = float(value)
            if value <= self.target if self.mode == "min" else value >= self.target:
                self.reached_at = (trainer.global_step, self._train_s)
                self._log(trainer, {"target/steps": float(trainer.global_step), "target/time_s": self._train_s,
                                    "target/reached": 1.0})
        self._since = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.reached_at is None:
            if self._since is not None:
                self._train_s += time.perf_counter() - self._since
                self._since = None
            self._log(trainer, {"target/reached": 0.0, "target/steps_at_least": float(trainer.global_step),
                                "target/time_s_at_least": self._train_s})

    @staticmethod
    def _log(trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"reached_at": self.reached_at, "train_s": self._train_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reached_at = state_dict["reached_at"]
        self._train_s = state_dict["train_s"]
