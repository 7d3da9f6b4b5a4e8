"""Optimizers the projects choose by name: AdamW, SGD with momentum, and Muon for the hidden matrices.

Muon (Jordan et al. 2024, `torch.optim.Muon`) replaces a matrix's momentum by its nearest
semi-orthogonal matrix (a 5-step Newton-Schulz iteration), so every update moves all singular
directions by about the same amount. It is made for the hidden matrices only: embeddings, the output
head, gains and biases stay with AdamW. Lightning drives one optimizer per module (unless the module
optimizes by hand), so `MuonAdamW` is one `torch.optim.Optimizer` that owns both: its param_groups
are what LR schedulers and gradient clipping see, its state_dict holds both children, and its `state`
shows both children's buffers to the memory ledger (Muon keeps one per matrix, AdamW two).

Conv filters (out, in, kh, kw) reach Muon as (out, in*kh*kw) matrices: views of the same storage,
so Muon's in-place update writes the filter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "muon")


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's two groups: decay on weights with >= 2 dims (matrices, embeddings, filters), none on
    biases and norm gains."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class MuonAdamW(torch.optim.Optimizer):
    """Muon on `hidden` (matrices, or filters seen as matrices), AdamW on `rest`: one optimizer.

    Groups 0.. are Muon's (one), the others AdamW's (decay and no-decay); each group's ``lr`` is its
    own peak, so a LambdaLR schedule scales both alike. Hyper-parameters a scheduler changes on
    `param_groups` reach the children at every `step`.

    Args:
        hidden: Parameters of >= 2 dims for Muon; one of more dims is flattened to (size(0), -1).
        rest: Parameters for AdamW (embeddings, head, gains, biases).
        lr: AdamW's learning rate.
        muon_lr: Muon's learning rate (torch scales it by sqrt(max(1, rows/cols)) per matrix).
        weight_decay: Decoupled decay for both (AdamW: on its >= 2-dim parameters only).
        betas: AdamW's betas.
        momentum: Muon's (Nesterov) momentum.
        fused: AdamW's fused kernel (None: torch's choice).
    """

    def __init__(self, hidden: Iterable[nn.Parameter], rest: Iterable[nn.Parameter], lr: float = 1e-3,
                 muon_lr: float = 0.02, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 momentum: float = 0.95, fused: bool | None = None):
        hidden, rest = [p for p in hidden if p.requires_grad], [p for p in rest if p.requires_grad]
        if bad := [tuple(p.shape) for p in hidden if p.dim() < 2]:
            raise ValueError(f"Muon orthogonalises matrices: parameters of shape {bad} have < 2 dims; "
                             "give them to AdamW (the `rest`)")
        if not hidden:
            raise ValueError("MuonAdamW got no hidden matrices for Muon; use AdamW instead")
        # a 2-D view sharing each filter's storage: Muon's in-place update writes the filter itself
        self._views = [p if p.dim() == 2 else p.detach().view(p.size(0), -1) for p in hidden]
        self.muon = torch.optim.Muon(self._views, lr=muon_lr, weight_decay=weight_decay, momentum=momentum)
        adam_groups = [g for g in decay_groups(rest, weight_decay) if g["params"]]
        self.adamw = torch.optim.AdamW(adam_groups, lr=lr, betas=tuple(betas), fused=fused) if adam_groups else None
        groups = [{"params": hidden, "lr": muon_lr, "weight_decay": weight_decay, "momentum": momentum}]
        groups += [{**g, "lr": lr} for g in adam_groups]
        super().__init__(groups, {})
        self._hidden = hidden
        self._children = [self.muon] + ([self.adamw] if self.adamw else [])
        # the children's per-parameter buffers, read by the memory ledger and moved by Lightning
        self.state = MergedState(self._children)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward
            with torch.enable_grad():
                loss = closure()
        # what a scheduler (or a user) set on this optimizer's groups; the children's group dicts are looked
        # up here, not kept: their load_state_dict replaces them
        theirs = (g for c in self._children for g in c.param_groups)
        for mine, child in zip(self.param_groups, theirs):
            child.update({k: v for k, v in mine.items() if k != "params"})
        for p, v in zip(self._hidden, self._views):
            v.grad = None if p.grad is None else (p.grad if v is p else p.grad.reshape(v.shape))
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        for p, v in zip(self._hidden, self._views):
            if v is not p:
                v.grad = None
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw", "param_groups"}:
            raise ValueError(f"not a MuonAdamW state_dict (keys {sorted(state_dict)}): was the checkpoint "
                             "written with another optimizer? Resume with the optimizer it was trained with")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(state_dict['param_groups'])} parameter groups, this "
                             f"optimizer {len(self.param_groups)}: the model's parameters differ")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)


class MergedState(Mapping):
    """The optimizers' per-parameter states read as one mapping. Each `state` is looked up at every read:
    an optimizer's load_state_dict replaces it. (A ChainMap would also add an empty entry to the first
    one's defaultdict at every lookup of a parameter that only the second one holds.)"""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def maps(self) -> list[Mapping]:
        return [o.state for o in self.optimizers]

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        for m in self.maps:
            if p in m:
                return m[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for m in self.maps for p in m)

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], kind: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.99), momentum: float = 0.95, muon_lr: float = 0.02,
                    is_hidden: Callable[[str, nn.Parameter], bool] | None = None,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer `kind` names, over the trainable parameters.

    adamw: AdamW with `decay_groups` (nanoGPT's). sgd: SGD with Nesterov `momentum` and the same
    groups (L2 decay). muon: `MuonAdamW`, Muon on the parameters `is_hidden(name, p)` picks (default:
    every parameter of >= 2 dims), AdamW on the rest.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(decay_groups((p for _, p in named), weight_decay), lr=lr, betas=tuple(betas),
                                 fused=fused)
    if kind == "sgd":
        return torch.optim.SGD(decay_groups((p for _, p in named), weight_decay), lr=lr, momentum=momentum,
                               nesterov=momentum > 0)
    is_hidden = is_hidden or (lambda n, p: p.dim() >= 2)
    hidden = [p for n, p in named if is_hidden(n, p)]
    return MuonAdamW(hidden, [p for n, p in named if not is_hidden(n, p)], lr=lr, muon_lr=muon_lr,
                     weight_decay=weight_decay, betas=betas, momentum=momentum, fused=fused)
