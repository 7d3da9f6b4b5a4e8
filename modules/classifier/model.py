"""LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling: the MNIST judge of the diffusion project.

Its 84-dimensional penultimate layer is the feature space in which generated digits are compared
with real ones (a Frechet distance like FID, with this network in place of Inception v3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LeNetConfig:
    """image_size: 28 (raw MNIST, conv1 pads by 2) or 32 (LeNet-5's own input, no padding)."""

    image_size: int = 28
    num_classes: int = 10
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size not in (28, 32):
            raise ValueError(f"LeNet image_size must be 28 or 32, got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LeNet(nn.Module):
    """conv5(6) - pool - conv5(16) - pool - fc120 - fc84 - fc(num_classes); 61,706 parameters for 10 classes."""

    num_features = 84  # width of `features`, read by torchmetrics' FrechetInceptionDistance

    def __init__(self, config: LeNetConfig) -> None:
        super().__init__()
        self.config = config
        # 28x28 inputs are padded to LeNet-5's 32x32 inside conv1, so both sizes reach 5x5x16.
        self.conv1 = nn.Conv2d(1, 6, 5, padding=(32 - config.image_size) // 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, config.num_classes)
        self.drop = nn.Dropout(config.dropout)

    def _fit_size(self, x: torch.Tensor) -> torch.Tensor:
        # Accept both 28x28 and 32x32 digits whatever the training size: crop or pad the 2-pixel
        # background border (value -1), so a judge trained on one size scores samples of the other.
        d = (x.shape[-1] - self.config.image_size) // 2
        if d > 0:
            return x[..., d:-d, d:-d]
        if d < 0:
            return F.pad(x, (-d, -d, -d, -d), value=-1.0)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28|32, 28|32) in [-1, 1] -> penultimate activations (B, 84)."""
        x = F.max_pool2d(F.relu(self.conv1(self._fit_size(x))), 2)  # (B, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 5, 5)
        x = self.drop(F.relu(self.fc1(x.flatten(1))))  # (B, 120)
        return F.relu(self.fc2(x))  # (B, 84)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) -> logits (B, num_classes)."""
        return self.fc3(self.drop(self.features(x)))


class LeNetFeatures(nn.Module):
    """The feature extractor handed to FrechetInceptionDistance(feature=...): images -> (B, 84)."""

    def __init__(self, lenet: LeNet) -> None:
        super().__init__()
        self.lenet = lenet
        self.num_features = lenet.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lenet.features(x)
