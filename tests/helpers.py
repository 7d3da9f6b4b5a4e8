"""What many tests need: a quiet plain Trainer, the real command line in a subprocess, a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


def quiet_trainer(**kw) -> L.Trainer:
    """A plain Lightning Trainer on the CPU without logger, checkpoints, progress bar or model summary:
    how a project runs outside the pipeline. Keyword arguments override (max_steps, callbacks, ...)."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **kw})


def practicum_cli(*args: str, timeout: int = 600, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [LAUNCHER] -m pipelines ARGS`` in a fresh process (the real entry point), with the
    repository on the path so the tests' toy project imports."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *launcher, "-m", "pipelines", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
