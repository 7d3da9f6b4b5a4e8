"""ClassifierModule: trains the LeNet judge; `load_judge` gives it back from a checkpoint."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from modules.classifier.model import LeNet, LeNetConfig
from modules.optimizers import OPTIMIZERS, build_optimizer


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of LeNet on (images in [-1, 1], labels) batches.

    Args:
        image_size: 28 or 32, the size of the training images (MNISTDataModule pad_to_32).
        num_classes: number of labels.
        dropout: dropout before the last two linear layers.
        lr: Learning rate (AdamW's, SGD's, or with optimizer="muon" that of the AdamW part).
        weight_decay: Weight decay.
        optimizer: "adamw", "sgd" (Nesterov momentum) or "muon": Muon on the conv filters (flattened
            to out x in*k*k matrices) and the hidden linear layers, AdamW on the output layer and the
            biases (`modules.optimizers.MuonAdamW`).
        muon_lr: Muon's learning rate.
        momentum: Momentum of Muon and of SGD.
        max_shift: random translation of up to this many pixels per training image (0 = off);
            a cheap augmentation that matters on the 4,000-image mnist5k training split.
        judge_path: also save the trained classifier here at the end of fit (a Lightning
            checkpoint), a fixed path a diffusion config can name as its `classifier_checkpoint`:
            the best checkpoint's weights, whose accuracy the run reports.
    """

    def __init__(
        self,
        image_size: int = 28,
        num_classes: int = 10,
        dropout: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_shift: int = 2,
        judge_path: str | None = None,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        momentum: float = 0.95,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.save_hyperparameters()
        self.net = LeNet(LeNetConfig(image_size=image_size, num_classes=num_classes, dropout=dropout))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        # Pad with background and crop back at a random offset, one offset per batch (cheap and enough).
        s = self.hparams.max_shift
        if s == 0:
            return x
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        h, w = x.shape[-2:]
        return F.pad(x, (s, s, s, s), value=-1.0)[..., dy : dy + h, dx : dx + w]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(self._shift(x)), y)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def on_train_end(self) -> None:
        """Export the judge: the checkpoint the run selected as best (the one it tests and reports
        accuracy for), not the last epoch's weights; without a checkpoint callback, the weights as they are."""
        if not self.hparams.judge_path:
            return
        path = Path(os.path.expanduser(self.hparams.judge_path))
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or ""
        if not (best and Path(best).is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.trainer.save_checkpoint(path, weights_only=True)
            return
        if self.trainer.is_global_zero:
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            # what load_from_checkpoint needs; the optimizer and loop states stay behind, as weights_only would
            torch.save({k: ckpt[k] for k in ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch",
                                             "global_step") if k in ckpt}, path)
        self.trainer.strategy.barrier()

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adamw":  # the judge's own recipe: decay on every parameter
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # Muon's authors keep the output layer on AdamW; the filters and hidden layers are Muon's
        return build_optimizer(self.net.named_parameters(), hp.optimizer, hp.lr, hp.weight_decay, momentum=hp.momentum,
                               muon_lr=hp.muon_lr, is_hidden=lambda n, p: p.dim() >= 2 and not n.startswith("fc3"))


def load_judge(path: str) -> LeNet:
    """The LeNet of a ClassifierModule checkpoint (the pipeline's or `judge_path`), in eval mode, frozen."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise FileNotFoundError(
            f"classifier_checkpoint {path!r} does not exist: train the judge first "
            "(practicum run configs/classifier/lenet_mnist5k.yaml writes checkpoints/classifier/lenet_mnist5k.ckpt) "
            "or point classifier_checkpoint at another ClassifierModule checkpoint"
        )
    module = ClassifierModule.load_from_checkpoint(p, map_location="cpu", weights_only=True)
    net = module.net.eval()
    net.requires_grad_(False)
    return net


def attach_judge(judges: dict[str, LeNet], path: str | None, owner: str, stage: str) -> None:
    """A generator module's `setup`: load its judge once into `judges` (a plain dict, so the judge's
    weights stay out of the generator's checkpoint), or warn at fit time that judged metrics are off."""
    if path and "lenet" not in judges:
        judges["lenet"] = load_judge(path)
    elif not path and stage == "fit":
        warnings.warn(
            f"{owner}: classifier_checkpoint is not set, so val/fid, val/fid_floor, val/class_coverage and "
            "val/classifier_confidence (and their test/ counterparts) are skipped. Train the judge first (practicum run "
            "configs/classifier/lenet_mnist5k.yaml) and pass --model.init_args.classifier_checkpoint=PATH.",
            stacklevel=3,
        )
