"""What a person sees in the terminal: quiet by default, one line per run (a study's progress line is
`pipelines.callbacks.ProgressLine`).

Lightning, MLflow and Python warnings speak only for errors unless ``--verbose`` is given; the
full record of a run (its config, metrics, logs) is in MLflow, not the terminal.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

# The loggers that narrate every run: "GPU available", "Seed set to", the LitLogger tip,
# "Restoring states from ...", MLflow's system-metrics and database-migration INFO lines.
CHATTY = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric",
          "mlflow", "alembic", "optuna", "transformers", "peft", "diffusers", "urllib3")
_verbose = False


def configure(verbose: bool = False) -> None:
    """Quiet (the default): the chatty libraries log errors only; Python warnings are hidden.
    Verbose: everything, as the libraries print it."""
    global _verbose
    _verbose = verbose
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    if not verbose:  # MLflow's per-download bars (model logging, artifact fetches)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if verbose:
        warnings.resetwarnings()
    else:
        warnings.filterwarnings("ignore")
    apply()


def apply() -> None:
    """Set the libraries' log levels again: importing Lightning or MLflow resets their own to INFO, so the
    run path calls this once they are imported."""
    level = logging.INFO if _verbose else logging.ERROR
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
    if "optuna" in sys.modules:  # its trial INFO lines go through its own switch
        sys.modules["optuna"].logging.set_verbosity(level)


def is_verbose() -> bool:
    return _verbose


def is_terminal(stream=None) -> bool:
    """Whether `stream` (stdout by default) is a terminal that redraws a bar in place; a file, a pipe,
    `tee`, a CI log or a notebook cell is not, and would keep every frame as a line."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def trainer_overrides(trainer_cfg: dict, progress_bar: bool) -> dict:
    """Trainer arguments that keep a quiet run quiet, where the config leaves them at their default
    (a config that sets ``enable_model_summary`` or ``enable_progress_bar`` keeps its choice).
    Lightning's bar is off when the caller draws its own or stdout is no terminal."""
    if _verbose:
        return {}
    out = {}
    if trainer_cfg.get("enable_model_summary") is None:
        out["enable_model_summary"] = False
    if (not progress_bar or not is_terminal()) and trainer_cfg.get("enable_progress_bar") is None:
        out["enable_progress_bar"] = False
    return out


class PlainProgress:
    """The study's progress as plain lines, for output that is not a terminal: a line when a run starts
    (`started`), the caller's line when it ends (`write`), and in between at most one line of progress
    every `every_s` seconds (`set_postfix_str`, which a `tqdm` bar would redraw in place)."""

    def __init__(self, total: int, desc: str, stream=None, every_s: float = 60.0, clock=time.monotonic):
        self.total, self.desc, self.n = total, desc, 0
        self.begun = 0  # runs started: with workers, several start before the first ends
        self.stream, self.every_s, self.clock = stream, every_s, clock
        self._last = clock()

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def started(self, label: str) -> None:
        self._last = self.clock()
        self.begun = min(self.total, max(self.begun, self.n) + 1)  # a resumed study counts its done runs
        self._print(f"[{self.desc}] {label}: started ({self.begun} of {self.total})")

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        now = self.clock()
        if text and now - self._last >= self.every_s:
            self._last = now
            self._print(f"[{self.desc}] {self.n}/{self.total} done; {text}")

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass


def started(bar, label: str) -> None:
    """A run begins: its own line in a log, the bar's postfix on a terminal."""
    if isinstance(bar, PlainProgress):
        bar.started(label)
    else:
        bar.set_postfix_str(label)


def progress(total: int, desc: str):
    """The study-wide progress display: a `tqdm` bar redrawn in place on a terminal, plain lines elsewhere."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="run", position=0, leave=False, dynamic_ncols=True)
    return PlainProgress(total, desc)


def summary_line(label: str, res, metric: str, seconds: float) -> str:
    """``variant seed=0: FINISHED  val/loss 2.314  (12.3 s)``; the error's first line when it failed."""
    value = res.metrics.get(metric) if res.metrics else None
    shown = f"  {metric} {value:.4g}" if value is not None else ""
    tail = f"  ({res.error})" if res.error else ""
    return f"{label}: {res.status}{shown}  ({seconds:.1f} s){tail}"
