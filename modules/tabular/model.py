"""A multilayer perceptron for tabular features: the deep-learning side of the tabular study.

    h_0 = x                                       # (B, d) standardised features
    h_l = dropout(relu(Linear_l(h_{l-1})))        # l = 1..depth, width W
    logits = Linear(h_depth)                      # (B, K)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TabularMLPConfig:
    """Sizes of :class:`TabularMLP`.

    Args:
        n_features: Input dimension d.
        n_classes: Number of classes K (>= 2).
        width: Hidden width W.
        depth: Hidden layers (>= 1).
        dropout: Dropout probability after each hidden layer, in [0, 1).
    """

    n_features: int
    n_classes: int
    width: int = 128
    depth: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.n_classes < 2:
            raise ValueError(f"n_features must be >= 1 and n_classes >= 2, got {self.n_features} and {self.n_classes}")
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={self.width}, depth={self.depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class TabularMLP(nn.Module):
    def __init__(self, config: TabularMLPConfig) -> None:
        super().__init__()
        self.config = config
        layers, d = [], config.n_features
        for _ in range(config.depth):
            layers += [nn.Linear(d, config.width), nn.ReLU(), nn.Dropout(config.dropout)]
            d = config.width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, config.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, K) logits
