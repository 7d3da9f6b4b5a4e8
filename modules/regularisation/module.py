"""Overfitting made visible: a CNN (LeNet-5) or an MLP of about the same size on a few hundred digits.

`RegularisationModule` trains either network with the regulariser a study names, chosen at
construction: dropout, weight decay (AdamW's decoupled decay), data augmentation (random shifts
of up to `max_shift` pixels) or none; early stopping is the pipeline's choice of checkpoint
(`checkpoint_monitor: val/loss` tests the best epoch, `null` the last).

The overfitting is measured, not inferred from the training loss (which dropout and augmentation
inflate): at every validation the network, in eval mode, scores the whole training split
(`train/acc`), and at test `test/train_acc` and `test/gap` = train accuracy - test accuracy of the
tested weights.

Equal parameter count: LeNet-5 has 61,706 parameters; the MLP 784 -> 78 -> 10 has 62,020 (0.5% more).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from modules.classifier.model import LeNet, LeNetConfig
from modules.tabular.model import TabularMLP, TabularMLPConfig


class RegularisationModule(L.LightningModule):
    """A digit classifier (`arch` "cnn" or "mlp") trained with AdamW, regularised as configured.

    Args:
        arch: "cnn" (LeNet-5) or "mlp" (784 -> width^depth -> 10, ReLU).
        width: MLP hidden width (78 matches LeNet-5's parameter count at depth 1).
        depth: MLP hidden layers.
        dropout: Dropout probability (LeNet: after fc1 and fc2; MLP: after each hidden layer).
        weight_decay: AdamW's decoupled weight decay.
        max_shift: Random translation of the training images, in pixels (0: no augmentation).
        lr: AdamW learning rate.
    """

    def __init__(self, arch: Literal["cnn", "mlp"] = "cnn", width: int = 78, depth: int = 1, dropout: float = 0.0,
                 weight_decay: float = 0.0, max_shift: int = 0, lr: float = 2e-3) -> None:
        super().__init__()
        if arch not in ("cnn", "mlp"):
            raise ValueError(f"arch must be 'cnn' or 'mlp', got {arch!r}")
        if max_shift < 0 or weight_decay < 0 or not lr > 0:
            raise ValueError(f"max_shift and weight_decay must be >= 0 and lr > 0; got {max_shift}, {weight_decay}, {lr}")
        self.save_hyperparameters()
        self.net = (LeNet(LeNetConfig(28, 10, dropout)) if arch == "cnn"
                    else TabularMLP(TabularMLPConfig(28 * 28, 10, width, depth, dropout)))
        self._test = [0, 0]  # correct, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x if self.hparams.arch == "cnn" else x.flatten(1))  # (B, 10)

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        s = self.hparams.max_shift
        if s == 0:
            return x
        # one offset per image: pad with background (-1) and crop back
        B, _, h, w = x.shape
        padded = F.pad(x, (s, s, s, s), value=-1.0)
        dy, dx = torch.randint(0, 2 * s + 1, (2, B)).tolist()
        return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(B)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(self._shift(x)), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    @torch.no_grad()
    def _train_accuracy(self) -> float:
        correct = seen = 0
        for x, y in self.trainer.datamodule.train_dataloader():  # a few hundred images
            x, y = x.to(self.device), y.to(self.device)
            correct += int((self(x).argmax(-1) == y).sum())
            seen += len(y)
        return correct / seen

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("train/acc", self._train_accuracy())

    def on_test_epoch_start(self) -> None:
        self._test = [0, 0]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._test[0] += int((logits.argmax(-1) == y).sum())
        self._test[1] += len(y)
        self.log("test/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("test/acc", (logits.argmax(-1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def on_test_epoch_end(self) -> None:
        train = self._train_accuracy()
        self.log_dict({"test/train_acc": train, "test/gap": train - self._test[0] / max(self._test[1], 1)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
