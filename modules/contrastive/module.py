"""RepresentationModule: trains the encoder of `model.py` by one objective, then judges its frozen
features by a linear probe (the standard protocol of SimCLR, Chen et al. 2020, section 4).

The probe: the frozen encoder's features of the training split, a class-balanced fraction of its
labels (1%, 10%, 100% by default), a standardised multinomial logistic regression (scikit-learn),
scored on the held-out split: val/probe_acc_{p}pct at every validation, test/probe_acc_{p}pct after
fit. The same encoder architecture, data (MNISTDataModule) and budget for every objective: the
objective is the only difference. After the test, a 2-D t-SNE of the test features coloured by
class is logged (embedding/tsne.png, and its points as embedding/tsne.json).
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from modules.artifacts import log_figure, log_text
from modules.contrastive.loss import nt_xent
from modules.contrastive.model import RepresentationConfig, RepresentationModel, augment


def balanced_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of `fraction` of each class's examples (at least one per class), drawn with rng."""
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=max(1, round(fraction * len(idx))), replace=False))
    return np.sort(np.concatenate(keep))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 fractions: list[float], seed: int) -> dict[float, float]:
    """Test accuracy of a logistic regression on standardised features, per label fraction."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for frac in fractions:
        idx = balanced_subset(train_y, frac, np.random.default_rng(seed))
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(train_x[idx], train_y[idx])
        out[frac] = float((clf.predict(test_x) == test_y).mean())
    return out


class RepresentationModule(L.LightningModule):
    def __init__(
        self,
        objective: str = "simclr",
        feature_dim: int = 64,
        width: int = 16,
        proj_dim: int = 32,
        num_classes: int = 10,
        temperature: float = 0.5,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        label_fractions: list[float] = (0.01, 0.1, 1.0),
        probe_seed: int = 0,
        embedding_plot: bool = True,
    ):
        """Args:
            objective, feature_dim, width, proj_dim, num_classes: see `RepresentationConfig`.
            temperature: NT-Xent's tau (SimCLR only): lower sharpens the softmax over negatives.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            label_fractions: fractions of the training labels the probe is fitted on, each in (0, 1].
            probe_seed: seed of the labelled subsets (the same subsets for every objective).
            embedding_plot: log a t-SNE of the test features after the test.
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not label_fractions or any(not 0 < f <= 1 for f in label_fractions):
            raise ValueError(f"label_fractions must be fractions in (0, 1], got {label_fractions}")
        self.save_hyperparameters()
        self.model = RepresentationModel(RepresentationConfig(objective, feature_dim, width, proj_dim, num_classes))
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (features, labels) of the split being scored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> the features the probe reads (B, F)."""
        return self.model.features(x)

    def objective_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        m, objective = self.model, self.hparams.objective
        if objective == "simclr":
            z1, z2 = m.head(m.features(augment(x))), m.head(m.features(augment(x)))
            return nt_xent(z1, z2, self.hparams.temperature)
        if objective == "autoencoder":
            return F.mse_loss(m.decoder(m.features(x)), x)
        if objective == "vae":
            return m.vae_loss(x)
        if objective == "supervised":  # the same augmentation as SimCLR's views: the labels are the only gain
            return F.cross_entropy(m.classifier(m.features(augment(x))), y)
        return None  # random: nothing to learn

    def training_step(self, batch, batch_idx):
        loss = self.objective_loss(*batch)
        if loss is None:  # Lightning skips the optimizer step; the encoder stays at its initialisation
            return None
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # -- the probe ---------------------------------------------------------------------------
    @torch.no_grad()
    def _train_features(self) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        for x, y in self.trainer.datamodule.train_dataloader():
            feats.append(self(x.to(self.device)).cpu())
            labels.append(y)
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()

    def _score(self, split: str) -> None:
        x = torch.cat([f for f, _ in self._held]).numpy()
        y = torch.cat([y for _, y in self._held]).numpy()
        self._held = []
        was_training = self.training
        self.eval()
        try:
            train_x, train_y = self._train_features()
        finally:
            self.train(was_training)
        accs = linear_probe(train_x, train_y, x, y, list(self.hparams.label_fractions), self.hparams.probe_seed)
        for frac, acc in accs.items():
            self.log(f"{split}/probe_acc_{frac * 100:g}pct", acc)
        if split == "test" and self.hparams.embedding_plot and self.trainer.is_global_zero:
            self._log_embedding(x, y)

    def _hold(self, batch) -> torch.Tensor | None:
        x, y = batch
        self._held.append((self(x).cpu(), y.cpu()))
        return self.objective_loss(x, y)

    def validation_step(self, batch, batch_idx):
        loss = self._hold(batch)
        if loss is not None:
            self.log("val/loss", loss)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._held = []
            return
        self._score("val")

    def test_step(self, batch, batch_idx):
        loss = self._hold(batch)
        if loss is not None:
            self.log("test/loss", loss)

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _log_embedding(self, x: np.ndarray, y: np.ndarray) -> None:
        from matplotlib.figure import Figure
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=self.hparams.probe_seed).fit_transform(
            (x - x.mean(0)) / (x.std(0) + 1e-8))
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.add_subplot()
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=6)
        ax.legend(*sc.legend_elements(), loc="best", fontsize=6, markerscale=0.7)
        ax.set(title=f"t-SNE of {self.hparams.objective} features (test)", xticks=[], yticks=[])
        fig.tight_layout()
        log_figure(self.loggers, fig, "embedding/tsne.png")
        log_text(self.loggers, json.dumps({"xy": np.round(xy, 3).tolist(), "label": y.tolist()}), "embedding/tsne.json")
