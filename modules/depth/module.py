"""DepthModule: trains `DepthMLP` and records how the gradient and the activations change with depth.

Logged every `trainer.log_every_n_steps` steps (keys grouped by their first segment, so MLflow
charts each group together):
    grad_norm/layer_01 .. layer_NN, grad_norm/stem, grad_norm/head, grad_norm/total   the L2 norm of
        each block's W x W weight gradient (Lightning's `grad_norm`), layer 01 nearest the input
    grad_ratio/first_last        grad_norm/layer_01 / grad_norm/layer_NN
    act_mean/, act_std/, act_sat/ layer_00 .. layer_NN   per hidden activation (00: the stem's):
        mean, standard deviation, and the fraction saturated (sigmoid outside [0.01, 0.99],
        tanh |a| > 0.99, ReLU == 0)
At the end of training: grad_ratio/first_last_gmean (the geometric mean of the ratio over every
logged step, the run's summary), train/loss_epoch of the last epoch, and the figure
grad_norm_by_layer.png (gradient norm against layer, at the first logged step and averaged over training).
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from modules.artifacts import log_figure
from modules.depth.model import Activation, DepthConfig, DepthMLP, Init, Norm, geometric_mean


class DepthModule(L.LightningModule):
    """Cross-entropy training of a `DepthMLP` on (images, labels) batches.

    Args:
        depth, width, activation, residual, norm, init: see `DepthConfig`.
        optimizer: "sgd" (with momentum; the optimiser under which vanishing gradients show as slow
            early layers) or "adamw" (per-parameter step sizes hide much of it).
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
    """

    def __init__(
        self,
        depth: int = 4,
        width: int = 64,
        activation: Activation = "sigmoid",
        residual: bool = False,
        norm: Norm = "none",
        init: Init = "default",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        self.save_hyperparameters()
        self.net = DepthMLP(DepthConfig(depth=depth, width=width, activation=activation, residual=residual,
                                        norm=norm, init=init))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.epoch_loss = MeanMetric()
        self.grad_history: list[list[float]] = []  # per logged step: the weight-gradient norm of each layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _logging_step(self) -> bool:
        # Lightning writes on_step logs when (step + 1) % log_every_n_steps == 0: measure then only.
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        return (self.global_step + 1) % max(1, every) == 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        logging = self._logging_step()
        logits, hidden = self.net(x, return_hidden=True) if logging else (self.net(x), None)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.epoch_loss(loss.detach(), weight=len(y))
        self.log("train/loss_epoch", self.epoch_loss, on_step=False, on_epoch=True)
        if hidden is not None:
            self.log_dict(self._activation_stats(hidden), on_step=True)
        return loss

    @torch.no_grad()
    def _activation_stats(self, hidden: list[torch.Tensor]) -> dict[str, float]:
        act = self.hparams.activation
        out = {}
        for i, a in enumerate(hidden):
            if act == "sigmoid":
                sat = ((a < 0.01) | (a > 0.99)).float().mean()
            elif act == "tanh":
                sat = (a.abs() > 0.99).float().mean()
            else:
                sat = (a == 0).float().mean()
            out |= {f"act_mean/layer_{i:02d}": a.mean(), f"act_std/layer_{i:02d}": a.std(),
                    f"act_sat/layer_{i:02d}": sat}
        return out

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._logging_step():
            return
        norms = grad_norm(self.net, norm_type=2)  # {"grad_2.0_norm/<param>": ..., "grad_2.0_norm_total": ...}
        layers = [norms.get(f"grad_2.0_norm/{n}", torch.tensor(0.0)).item() for n in self.net.block_weight_names()]
        logged = {f"grad_norm/layer_{i:02d}": v for i, v in enumerate(layers, start=1)}
        logged["grad_norm/stem"] = norms.get("grad_2.0_norm/stem.weight", torch.tensor(0.0)).item()
        logged["grad_norm/head"] = norms.get("grad_2.0_norm/head.weight", torch.tensor(0.0)).item()
        logged["grad_norm/total"] = norms["grad_2.0_norm_total"].item()
        logged["grad_ratio/first_last"] = layers[0] / layers[-1] if layers[-1] > 0 else math.nan
        self.grad_history.append(layers)
        self.log_dict(logged, on_step=True, on_epoch=False)

    def on_train_end(self) -> None:
        if not self.grad_history or self.global_rank != 0:
            return
        g = np.asarray(self.grad_history)  # (logged steps, depth)
        summary = {"grad_ratio/first_last_gmean": geometric_mean(g[:, 0] / np.where(g[:, -1] > 0, g[:, -1], np.nan))}
        for lg in self.loggers:
            lg.log_metrics(summary, step=self.global_step)
        log_figure(self.loggers, self._grad_figure(g), "grad_norm_by_layer.png")

    def _grad_figure(self, g: np.ndarray):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.hparams
        fig, ax = plt.subplots(figsize=(6, 4))
        layers = np.arange(1, g.shape[1] + 1)
        ax.semilogy(layers, g[0], marker="o", label="first logged step")
        ax.semilogy(layers, np.exp(np.log(np.maximum(g, 1e-30)).mean(0)), marker="s",
                    label="geometric mean over training")
        ax.set(xlabel="block (1 = nearest the input)", ylabel="weight-gradient L2 norm",
               title=f"depth {h.depth}, {h.activation}, residual={h.residual}, norm={h.norm}")
        ax.legend()
        fig.tight_layout()
        plt.close(fig)
        return fig

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
