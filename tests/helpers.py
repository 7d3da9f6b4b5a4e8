"""What many tests need: a quiet plain Trainer, the real command line in a subprocess, a free port, a
checkpoint crafted to run code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

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


class Payload:
    """What a crafted checkpoint carries: unpickling it calls a function (here: touch `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def crafted_checkpoint(path: Path, marker: Path, class_path: str = "modules.gpt.module.GPTModule") -> Path:
    """A file that looks like a Practicum checkpoint (state_dict, hyper-parameters, class path) with a pickled
    `Payload` inside: a loader that unpickles freely touches `marker`; a safe one refuses the file."""
    torch.save({"state_dict": {}, "hyper_parameters": {"method": "lora"}, "pytorch-lightning_version": L.__version__,
                "practicum": {"class_path": class_path}, "tokenizer": Payload(marker)}, path)
    return path
