"""Seq2SeqModule: trains one arm of `model.py` on a `Seq2SeqTaskDataModule` task through the pipeline.

Scored by exact match (the whole target and its EOS right; under teacher forcing this equals greedy
decoding, see `exact_match`), overall and by length bucket on the test split, whose lengths run past
the training ones. After testing it logs, for the arms with attention from target to source, the
attention maps of one test string per `map_lengths` as figures, and `test/attn_copy_mass`: the best
head's mean attention mass on the source positions that hold the symbol its row emits (1 for a head
that routes each output to its source symbol; about 1 / n_symbols for one that does not look).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from contract import CountsTokens
from datamodules.seq2seq import make_target
from modules.artifacts import log_figure
from modules.optimizers import build_optimizer
from modules.seq2seq.model import Seq2Seq, Seq2SeqConfig, exact_match
from modules.training import cosine_schedule, log_mean_loss


def bucket_name(lo: int, hi: int) -> str:
    return f"len{lo}to{hi}"


class Seq2SeqModule(L.LightningModule, CountsTokens):
    def __init__(
        self,
        arm: str = "cross",
        n_symbols: int = 10,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
        lr: float = 3e-3,
        min_lr: float = 3e-4,
        warmup_steps: int = 50,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        length_buckets: list[int] = [8, 13, 17, 25, 33],  # noqa: B006  (jsonargparse reads the default)
        map_lengths: list[int] = [12, 24],  # noqa: B006
        map_seed: int = 0,
    ):
        """One arm of the attention-routing study.

        Args:
            arm, n_symbols, n_layer, n_head, n_embd, dropout: see `Seq2SeqConfig`.
            lr, min_lr, warmup_steps, lr_decay_steps: the mini-GPT's cosine schedule (`cosine_schedule`);
                lr_decay_steps None means trainer.max_steps.
            weight_decay, betas: AdamW's (decay on the weight matrices only).
            length_buckets: Edges of the test's length buckets: [8, 13, 17] logs test/exact_match_len8to12
                and _len13to16. test/exact_match_drop is the first bucket's exact match minus the second's.
            map_lengths: Source lengths of the strings whose attention maps are logged after testing.
            map_seed: Seeds the strings of the maps and of test/attn_copy_mass.
        """
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0 or not 0 <= min_lr <= lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
        if len(length_buckets) < 3 or any(b >= a for b, a in zip(length_buckets, length_buckets[1:])) \
                or length_buckets[0] < 1:
            raise ValueError(f"length_buckets must be at least 3 increasing positive edges (two buckets), "
                             f"got {length_buckets}")
        self.model = Seq2Seq(Seq2SeqConfig(n_symbols, arm, n_layer, n_head, n_embd, dropout))
        self.loss = torch.nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.em = torch.nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self._by_length = torch.zeros(2, length_buckets[-1], dtype=torch.long)  # (right, total) per length

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        vocab = getattr(dm, "vocab", None)
        if vocab is not None and vocab != self.model.vocab:
            raise ValueError(f"model n_symbols={self.hparams.n_symbols} but the datamodule has "
                             f"{vocab.n_symbols}; set model.init_args.n_symbols to data.init_args.n_symbols")

    def tokens_per_batch(self, batch) -> int:
        return int(batch["src_len"].sum() + batch["tgt_len"].sum())

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(self.model.named_parameters(), "adamw", hp.lr, hp.weight_decay, tuple(hp.betas))
        decay = hp.lr_decay_steps if hp.lr_decay_steps is not None else self.trainer.max_steps
        if decay is None or decay < 0:
            raise ValueError("set model.init_args.lr_decay_steps or trainer.max_steps: "
                             "the cosine schedule needs an end")
        return {"optimizer": opt, "lr_scheduler": cosine_schedule(opt, hp.warmup_steps, decay, hp.min_lr / hp.lr)}

    def _step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, targets = self.model(batch["src"], batch["src_len"], batch["tgt"], batch["tgt_len"])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return loss, exact_match(logits, targets)

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _score(self, batch, split: str) -> torch.Tensor:
        loss, right = self._step(batch)
        self.loss[split].update(loss, weight=int(batch["tgt_len"].sum() + batch["tgt_len"].numel()))
        self.em[split].update(right.float())
        return right

    def validation_step(self, batch, batch_idx):
        self._score(batch, "val")

    def on_validation_epoch_end(self) -> None:
        log_mean_loss(self, "val", self.loss["val"])
        self.log("val/exact_match", self.em["val"].compute())
        self.em["val"].reset()

    def on_test_epoch_start(self) -> None:
        self._by_length.zero_()

    def test_step(self, batch, batch_idx):
        right = self._score(batch, "test").cpu().long()
        n = batch["src_len"].cpu().clamp(max=self._by_length.size(1) - 1)
        self._by_length[0].index_add_(0, n, right)
        self._by_length[1].index_add_(0, n, torch.ones_like(right))

    def on_test_epoch_end(self) -> None:
        log_mean_loss(self, "test", self.loss["test"])
        self.log("test/exact_match", self.em["test"].compute())
        self.em["test"].reset()
        edges = self.hparams.length_buckets
        buckets = []
        for lo, hi in zip(edges, edges[1:]):
            right, total = self._by_length[:, lo:hi].sum(1).tolist()
            if total:
                buckets.append(right / total)
                self.log(f"test/exact_match_{bucket_name(lo, hi - 1)}", right / total)
        if len(buckets) >= 2:
            self.log("test/exact_match_drop", buckets[0] - buckets[1])
        if self.trainer.is_global_zero:
            self._log_figures()

    # -- figures -------------------------------------------------------------------------------
    def _strings(self, length: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n source strings of `length` and their targets under the datamodule's task."""
        task = self.trainer.datamodule.task
        g = torch.Generator().manual_seed(self.hparams.map_seed)
        srcs = [torch.randint(self.hparams.n_symbols, (length,), generator=g) for _ in range(n)]
        return [(s.to(self.device), make_target(task, s).to(self.device)) for s in srcs]

    def _log_figures(self) -> None:
        loggers = self.loggers
        log_figure(loggers, by_length_figure(self._by_length, self.hparams.arm), "exact_match_by_length.png")
        if self.model.config.arm == "pooled" or getattr(self.trainer, "datamodule", None) is None:
            return
        for length in self.hparams.map_lengths:
            src, tgt = self._strings(length, 1)[0]
            maps = self.model.source_attention(src, tgt)
            log_figure(loggers, attention_figure(maps, src, tgt, self.hparams.arm), f"attention/len{length}.png")
        mass = copy_mass(self.model, self._strings(self.trainer.datamodule.train_lengths[1] * 3 // 4, 32))
        self.log("test/attn_copy_mass", mass)


@torch.no_grad()
def copy_mass(model: Seq2Seq, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The best (layer, head)'s mean attention mass on the source positions holding the symbol its row
    emits, over the target rows (not the EOS row) of the given (src, tgt) pairs."""
    total = None
    for src, tgt in pairs:
        maps = torch.stack(model.source_attention(src, tgt))  # (layers, nh, T + 1, S)
        match = (tgt[:, None] == src[None, :]).to(maps.dtype)  # (T, S)
        mass = (maps[:, :, : tgt.numel()] * match).sum(-1).mean(-1)  # (layers, nh)
        total = mass if total is None else total + mass
    return float(total.max() / len(pairs))


def by_length_figure(by_length: torch.Tensor, arm: str):
    from matplotlib.figure import Figure

    right, total = by_length.float()
    lengths = torch.nonzero(total).flatten()
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.plot(lengths.numpy(), (right[lengths] / total[lengths]).numpy(), marker="o")
    ax.set(xlabel="source length", ylabel="exact match", ylim=(-0.02, 1.02), title=f"{arm}: exact match by length")
    fig.tight_layout()
    return fig


def attention_figure(maps: list[torch.Tensor], src: torch.Tensor, tgt: torch.Tensor, arm: str):
    """Layers as rows, heads as columns: each panel (target rows incl. EOS) x (source columns)."""
    from matplotlib.figure import Figure

    n_layer, n_head = len(maps), maps[0].size(0)
    fig = Figure(figsize=(2.2 * n_head, 2.2 * n_layer + 0.4))
    what = "cross-attention" if arm == "cross" else "self-attention, target rows over source columns"
    fig.suptitle(f"{arm}: {what} (source {''.join(map(str, src.tolist()))})", fontsize=9)
    for i, w in enumerate(maps):
        for h in range(n_head):
            ax = fig.add_subplot(n_layer, n_head, i * n_head + h + 1)
            ax.imshow(w[h].float().cpu().numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f"layer {i}: emitted", fontsize=7)
            if i == n_layer - 1:
                ax.set_xlabel(f"head {h}: source", fontsize=7)
    fig.tight_layout()
    return fig
