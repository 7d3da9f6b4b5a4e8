"""Artifacts a project logs besides scalars (text samples, figures, image grids, folders).

The one helper a project uses for them: it takes the Lightning loggers it was given and writes to
each one that can hold the thing: an MLflow logger (the pipeline's, or any ``MLFlowLogger``) as a
run artifact, a TensorBoard logger as text or an image; other loggers are skipped. So a project
runs under a plain ``Trainer`` with any logger, or none, and never imports the pipeline. Call it
on global rank 0 only (Lightning's loggers are no-ops elsewhere anyway).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


def _mlflow(logger) -> tuple[Any, str] | None:
    run_id = getattr(logger, "run_id", None)
    exp = getattr(logger, "experiment", None) if run_id else None
    return (exp, run_id) if exp is not None and hasattr(exp, "log_artifact") else None


def _tensorboard(logger):
    exp = getattr(logger, "experiment", None)
    return exp if exp is not None and hasattr(exp, "add_text") else None


def log_text(loggers: Iterable, text: str, artifact_file: str, step: int = 0) -> None:
    for lg in loggers:
        if ml := _mlflow(lg):
            ml[0].log_text(ml[1], text, artifact_file)
        elif tb := _tensorboard(lg):
            tb.add_text(artifact_file, text, step)


def log_figure(loggers: Iterable, fig, artifact_file: str, step: int = 0) -> None:
    for lg in loggers:
        if ml := _mlflow(lg):
            ml[0].log_figure(ml[1], fig, artifact_file)
        elif tb := _tensorboard(lg):
            tb.add_figure(artifact_file, fig, step)


def log_image(loggers: Iterable, image: np.ndarray, artifact_file: str, step: int = 0) -> None:
    """A (H, W) or (H, W, C) uint8 image."""
    for lg in loggers:
        if ml := _mlflow(lg):
            ml[0].log_image(ml[1], image, artifact_file=artifact_file)
        elif tb := _tensorboard(lg):
            tb.add_image(artifact_file, image, step, dataformats="HW" if image.ndim == 2 else "HWC")


def log_file(loggers: Iterable, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """A file or a whole folder (MLflow only: TensorBoard holds no files)."""
    p = Path(local_path)
    for lg in loggers:
        if ml := _mlflow(lg):
            (ml[0].log_artifacts if p.is_dir() else ml[0].log_artifact)(ml[1], str(p), artifact_path)


def image_grid(x: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad) uint8 image, white borders."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    return grid
