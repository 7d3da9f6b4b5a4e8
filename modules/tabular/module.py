"""TabularMLPModule: the MLP of `modules.tabular.model` trained with AdamW on a tabular datamodule.

Logs what the classics log, so one study table holds trees, SVMs, the NumPy logistic regression
and this network: `train/loss`, `val/loss`, `val/acc`, `test/acc`, `test/loss`, and
`perf/fit_time_s`, the wall time of the training steps (validation excluded, as the classics'
fit time excludes their scoring). The pipeline's resource callback adds `perf/predict_time_s`.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from modules.tabular.model import TabularMLP, TabularMLPConfig


class TabularMLPModule(L.LightningModule):
    """An MLP classifier for tabular data.

    Args:
        width: Hidden width.
        depth: Hidden layers.
        dropout: Dropout after each hidden layer.
        lr: AdamW learning rate.
        weight_decay: AdamW's decoupled weight decay.
        n_features: Input dimension; None reads `num_features` from the datamodule.
        n_classes: Number of classes; None reads `num_classes` from the datamodule.
    """

    def __init__(self, width: int = 128, depth: int = 2, dropout: float = 0.0, lr: float = 1e-3,
                 weight_decay: float = 0.0, n_features: int | None = None, n_classes: int | None = None) -> None:
        super().__init__()
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        self.save_hyperparameters()
        TabularMLPConfig(n_features or 1, n_classes or 2, width, depth, dropout)  # check the sizes now
        self.net: TabularMLP | None = None
        if n_features and n_classes:  # known: built now (a checkpoint's hparams carry them)
            self._build(n_features, n_classes)
        self.fit_time_s = 0.0

    def _build(self, d: int, k: int) -> None:
        h = self.hparams
        self.net = TabularMLP(TabularMLPConfig(d, k, h.width, h.depth, h.dropout))

    def setup(self, stage: str) -> None:
        if self.net is not None:
            return
        dm = self.trainer.datamodule
        d, k = getattr(dm, "num_features", None), getattr(dm, "num_classes", None)
        if d is None or k is None:
            raise ValueError("n_features and n_classes are unknown: set model.init_args.n_features/n_classes "
                             "or use a datamodule with num_features/num_classes (TabularDataModule)")
        self.hparams.n_features, self.hparams.n_classes = d, k  # saved with the checkpoint
        self._build(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        n = len(y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=stage != "train", batch_size=n)
        if stage != "train":
            self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.fit_time_s += time.perf_counter() - self._t0

    def on_train_epoch_end(self) -> None:
        self.log("perf/fit_time_s", self.fit_time_s)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
