"""What a person sees in the terminal: quiet by default, one line per run (a study's progress line is
`pipelines.callbacks.ProgressLine`).

Lightning, MLflow and Python warnings speak only for errors unless ``--verbose`` is given; the
full record of a run (its config, metrics, logs) is in MLflow, not the terminal.
"""

from __future__ import annotations

import logging
import sys
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


def trainer_overrides(trainer_cfg: dict, progress_bar: bool) -> dict:
    """Trainer arguments that keep a quiet run quiet, where the config leaves them at their default
    (a config that sets ``enable_model_summary`` or ``enable_progress_bar`` keeps its choice)."""
    if _verbose:
        return {}
    out = {}
    if trainer_cfg.get("enable_model_summary") is None:
        out["enable_model_summary"] = False
    if not progress_bar and trainer_cfg.get("enable_progress_bar") is None:
        out["enable_progress_bar"] = False
    return out


def summary_line(label: str, res, metric: str, seconds: float) -> str:
    """``variant seed=0: FINISHED  val/loss 2.314  (12.3 s)``; the error's first line when it failed."""
    value = res.metrics.get(metric) if res.metrics else None
    shown = f"  {metric} {value:.4g}" if value is not None else ""
    tail = f"  ({res.error})" if res.error else ""
    return f"{label}: {res.status}{shown}  ({seconds:.1f} s){tail}"
