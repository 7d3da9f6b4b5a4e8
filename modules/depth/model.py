"""Why deep plain networks stop learning, what residual connections and normalisation change.

A multilayer perceptron on 28x28 digits whose depth, width, activation, residual connections,
normalisation and initialisation are chosen by `DepthConfig`, and hand-written BatchNorm,
LayerNorm and RMSNorm (the teaching core, each tested against torch's own layer).

The network (``depth`` hidden-to-hidden layers between a stem and a head; Nielsen's
[784, 30, 30, 30, 30, 10] is depth=3, width=30: four hidden layers, three of them width-to-width)::

    h_0 = stem(x)                                   # Linear(784, W)
    h_l = h_{l-1} + Linear_l(act(norm_l(h_{l-1})))  # l = 1..depth, residual=True (pre-activation
    h_l =           Linear_l(act(norm_l(h_{l-1})))  #   ordering, He et al. 2016 "Identity mappings")
    logits = head(act(norm_f(h_depth)))             # Linear(W, 10)

The gradient ratio compares Linear_1 with Linear_depth: two W x W matrices that differ only in
where they sit, so the ratio measures depth and not the shape of the input (the stem's gradient
is the error times the 784 pixels, whose norm is several times a hidden layer's).

With residual=False and norm="none" this is exactly the textbook MLP x -> σ(W1 x) -> σ(W2 .) -> ... :
only the place where the code draws the block boundary differs.

Why plain sigmoid nets stop learning (Nielsen, "Neural networks and deep learning", ch. 5):
backpropagation multiplies the error by W_l^T diag(σ'(z_l)) once per layer, and σ' <= 1/4, so with
weights of order one the gradient reaching layer 1 is smaller than the last layer's by a factor
that grows geometrically with depth. A residual block's Jacobian is I + W_l^T diag(act'(.)) ...:
the identity carries the error to every layer unshrunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["sigmoid", "tanh", "relu"]
Norm = Literal["none", "batch", "layer", "rms"]
Init = Literal["default", "normal", "xavier", "kaiming"]
ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu}


# ---- the normalisation layers (teaching core) --------------------------------------------------


class BatchNorm(nn.Module):
    """Batch normalisation over (B, C) inputs (Ioffe & Szegedy 2015, Algorithm 1 and 2).

    Training: normalise each feature with the mean and (biased) variance of the current batch, and
    move the running estimates towards them: running <- (1 - momentum) * running + momentum * batch,
    the running variance from the unbiased batch variance (torch's convention).
    Evaluation: normalise with the running estimates, so a sample's output no longer depends on the
    other samples of its batch. The gap between the two is what small batches make large.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C) -> (B, C)."""
        if self.training:
            n = x.shape[0]
            if n < 2:
                raise ValueError(
                    f"BatchNorm in training mode needs at least 2 samples per batch to estimate a variance, "
                    f"got a batch of {n}: raise the batch size or use norm='layer' or 'rms'")
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Layer normalisation (Ba et al. 2016): each sample normalised over its own C features, so train
    and eval compute the same thing at any batch size."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C)."""
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class RMSNorm(nn.Module):
    """RMS normalisation (Zhang & Sennrich 2019): LayerNorm without the centring and the bias,
    x / sqrt(mean(x^2) + eps) * g."""

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C)."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: Norm, num_features: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return {"batch": BatchNorm, "layer": LayerNorm, "rms": RMSNorm}[kind](num_features)


# ---- the network ---------------------------------------------------------------------------------


@dataclass
class DepthConfig:
    """depth: width-to-width hidden layers (>= 1); width: units per hidden layer; activation: sigmoid, tanh or relu;
    residual: identity shortcuts around every block; norm: none, batch, layer or rms,
    before every activation; init: "default" (torch's U(+-1/sqrt(fan_in))), "normal" (N(0, 1)
    weights and biases, Nielsen's ch. 5 set-up), "xavier" (Glorot normal, zero bias) or "kaiming"
    (He normal for ReLU, std sqrt(2/fan_in), zero bias)."""

    depth: int = 4
    width: int = 64
    activation: Activation = "sigmoid"
    residual: bool = False
    norm: Norm = "none"
    init: Init = "default"
    in_features: int = 784
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth (width-to-width layers) must be >= 1, got {self.depth}")
        if self.width < 1 or self.in_features < 1 or self.num_classes < 2:
            raise ValueError(f"width and in_features must be >= 1 and num_classes >= 2, got width={self.width}, "
                             f"in_features={self.in_features}, num_classes={self.num_classes}")
        for name, value, allowed in (("activation", self.activation, ACTIVATIONS), ("norm", self.norm,
                                     ("none", "batch", "layer", "rms")),
                                     ("init", self.init, ("default", "normal", "xavier", "kaiming"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class DepthMLP(nn.Module):
    """stem, `depth` blocks (``blocks[l].linear``: hidden layer l+1's width x width Linear), head."""

    def __init__(self, config: DepthConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.act = ACTIVATIONS[c.activation]
        self.stem = nn.Linear(c.in_features, c.width)
        self.blocks = nn.ModuleList([Block(c.width, c.norm, self.act, c.residual) for _ in range(c.depth)])
        self.norm_f = make_norm(c.norm, c.width)
        self.head = nn.Linear(c.width, c.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init = self.config.init
        if init == "default":
            return
        for lin in [self.stem, *(b.linear for b in self.blocks), self.head]:
            if init == "normal":
                nn.init.normal_(lin.weight)
                nn.init.normal_(lin.bias)
                continue
            if init == "xavier":
                nn.init.xavier_normal_(lin.weight)
            else:
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        """x (B, ...) with in_features values per sample -> logits (B, num_classes); with return_hidden
        also the depth + 1 hidden activations act(norm(h_l)), l = 0..depth, each (B, width)."""
        h = self.stem(x.flatten(1))  # (B, W)
        hidden = []
        for block in self.blocks:
            h, a = block(h)
            hidden.append(a)
        a = self.act(self.norm_f(h))
        hidden.append(a)
        logits = self.head(a)
        return (logits, hidden) if return_hidden else logits

    def block_weight_names(self) -> list[str]:
        """Parameter names of the blocks' W x W weights, the one nearest the input first."""
        return [f"blocks.{i}.linear.weight" for i in range(len(self.blocks))]


class Block(nn.Module):
    """h -> h + linear(act(norm(h))) (residual) or linear(act(norm(h))) (plain); returns the new h
    and the activation act(norm(h)) (B, W) for the statistics."""

    def __init__(self, width: int, norm: Norm, act, residual: bool) -> None:
        super().__init__()
        self.norm = make_norm(norm, width)
        self.linear = nn.Linear(width, width)
        self.act, self.residual = act, residual

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.act(self.norm(h))
        out = self.linear(a)
        return (h + out if self.residual else out), a


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def geometric_mean(values) -> float:
    v = [x for x in values if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else math.nan
