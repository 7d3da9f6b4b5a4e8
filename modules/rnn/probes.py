"""Two probes of any next-token model, for the rnn-vs-transformer study: a Lightning callback.

It asks of the LightningModule only what GPTModule and CharRNNModule both offer: `module(idx)`
returns (logits (B, T, V), ...) and the model embeds tokens with an `nn.Embedding` (the first one
registered: the token table). So one study compares an LSTM and the mini-GPT with the same code.

1. Loss by position (after the test): the test split in consecutive windows, the cross-entropy at
   each position t of the window, averaged over windows; position t has seen t + 1 tokens of
   context. Logged per octave of context, test/loss_ctx{a}to{b} (mean over 0-based positions
   a..b), and as a plot. A transformer attends to every earlier token of the window at the same
   cost; a recurrent model must carry them in its state, so the gap should grow with t.
2. Gradient norm through time (after fit): on a fixed validation batch, the loss at the LAST
   position only, and the norm of its gradient with respect to the input embedding d steps back,
   ||dL_T / de_{T-d}||, averaged over the batch and divided by d = 0's. Logged as grad_time/d{d}
   and as a plot: a plain RNN's falls geometrically with d (Bengio et al. 1994, the vanishing
   gradient of the depth-vs-residual study, here in time), an LSTM's much less.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.shakespeare import consecutive_windows
from modules.artifacts import log_figure


def token_embedding(model: nn.Module) -> nn.Embedding:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise ValueError(f"{type(model).__name__} has no nn.Embedding: the gradient-through-time probe needs one")


def octaves(length: int) -> list[tuple[int, int]]:
    """(first, last) 0-based positions of each octave of context: (0, 0), (1, 2), (3, 6), ... so the
    position with c tokens of context sits in the octave of c, the last one cut at length - 1."""
    out, a = [], 0
    while a < length:
        b = min(2 * a, length - 1)
        out.append((a, b))
        a = b + 1
    return out


@torch.no_grad()
def loss_by_position(module: nn.Module, data: torch.Tensor, block_size: int, batch: int = 64) -> torch.Tensor:
    """(T,) mean cross-entropy at each position of the consecutive test windows of `data`."""
    x, y = consecutive_windows(data, block_size)
    total = torch.zeros(block_size, dtype=torch.float64)
    device = next(module.parameters()).device
    for i in range(0, len(x), batch):
        logits = module(x[i : i + batch].to(device))[0]
        loss = F.cross_entropy(logits.transpose(1, 2).float(), y[i : i + batch].to(device), reduction="none")
        total += loss.sum(0).double().cpu()
    return total / len(x)


def grad_norm_through_time(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(T,) ||dL_T / de_t|| averaged over the batch, L_T the cross-entropy at the last position."""
    captured = {}

    def keep(_, __, out):
        out.retain_grad()
        captured["e"] = out

    handle = token_embedding(module).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = module(x)[0]
            F.cross_entropy(logits[:, -1].float(), y[:, -1]).backward()
    finally:
        handle.remove()
        module.zero_grad(set_to_none=True)
    return captured["e"].grad.norm(dim=-1).mean(0).detach().cpu()  # (T,)


class SequenceProbes(L.Callback):
    """Loss by position on the test split and the gradient norm through time (see the module docstring).

    Args:
        distances: steps back d at which grad_time/d{d} is logged (those < block_size).
    """

    def __init__(self, distances: list[int] = (1, 4, 16, 32, 63)):
        self.distances = list(distances)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        x, y = next(iter(trainer.datamodule.val_dataloader()))
        was_training = pl_module.training
        pl_module.eval()  # no dropout in the probe
        try:
            g = grad_norm_through_time(pl_module, x.to(pl_module.device), y.to(pl_module.device))
        finally:
            pl_module.train(was_training)
        ratio = (g / g[-1]).flip(0)  # ratio[d]: d steps back from the last position
        metrics = {f"grad_time/d{d}": float(ratio[d]) for d in self.distances if d < len(ratio)}
        _log(trainer, metrics)
        _plot(trainer, ratio.numpy(), "steps back d", "||dL_T/de_(T-d)|| / ||dL_T/de_T||", "grad_time.png", log=True)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or getattr(dm, "test_data", None) is None:
            return
        per_pos = loss_by_position(pl_module, dm.test_data, dm.block_size, dm.val_batch_size)
        metrics = {f"test/loss_ctx{a + 1}to{b + 1}": float(per_pos[a : b + 1].mean()) for a, b in octaves(len(per_pos))}
        _log(trainer, metrics)
        _plot(trainer, per_pos.numpy(), "position in the window (0-based)", "test cross-entropy",
              "loss_by_position.png", log=False)


def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    metrics = {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _plot(trainer: L.Trainer, values, xlabel: str, ylabel: str, name: str, log: bool) -> None:
    if not trainer.loggers:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot(values)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    log_figure(trainer.loggers, fig, f"probes/{name}")
