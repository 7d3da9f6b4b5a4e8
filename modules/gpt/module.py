"""GPTModule: trains the mini-GPT (dense or MoE, any attention variant) through the common pipeline."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from contract import CountsTokens, TextGenerator
from datamodules.shakespeare import consecutive_windows
from datamodules.tokenizers import Tokenizer, tokenizer_from_state
from modules.artifacts import log_figure, log_text
from modules.gpt.model import GPT, GPTConfig
from modules.gpt.moe import STAT_NAMES
from modules.optimizers import OPTIMIZERS, build_optimizer
from modules.training import SCHEDULES, log_mean_loss, lr_schedule


@functools.cache
def init_defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of `cls.__init__`: what a module's hyper-parameters hold when not given."""
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """What Muon takes in the mini-GPT: the blocks' 2-D weights; not the token or position tables nor
    the head (Muon's authors keep input and output layers on AdamW), nor stacked 3-D MoE experts."""
    return p.dim() == 2 and name.startswith("transformer.h.")


class GPTModule(L.LightningModule, TextGenerator, CountsTokens):
    def __init__(
        self,
        vocab_size: int | None = None,
        block_size: int | None = None,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        attention: str = "sdpa",
        n_kv_head: int | None = None,
        sliding_window: int | list[int | None] | None = None,
        pos_emb: str = "learned",
        rope_base: float = 10000.0,
        norm: str = "layernorm",
        mlp_hidden: int | None = None,
        ffn: str = "mlp",
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        moe_every: int = 1,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        dropless: bool = False,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 1e-3,
        shared_expert: bool = False,
        noisy_topk: bool = False,
        qk_norm: bool = False,
        mlp_act: str = "gelu",
        zero_init_proj: bool = False,
        tie_weights: bool = True,
        logit_softcap: float | None = None,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        momentum: float = 0.95,
        lr_schedule: str = "cosine",
        cooldown_frac: float = 0.4,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        fused: bool | None = None,
        compile: bool = False,
        sample_prompt: str = "\n",
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 200,
        sample_seed: int = 1337,
        eval_block_sizes: list[int] | None = None,
    ):
        """Mini-GPT language model; model fields are those of `GPTConfig`.

        Args:
            vocab_size: None takes the datamodule tokenizer's vocabulary in `setup`.
            block_size: None takes the datamodule's block_size in `setup`.
            n_layer, n_head, n_embd, dropout, bias, attention, n_kv_head, sliding_window, pos_emb,
                rope_base, norm, mlp_hidden, ffn, n_experts, top_k, expert_hidden, moe_every,
                capacity_factor, eval_capacity_factor, dropless, aux_loss_coef, z_loss_coef,
                shared_expert, noisy_topk, qk_norm, mlp_act, zero_init_proj, tie_weights,
                logit_softcap: see `GPTConfig`.
            optimizer: "adamw", "sgd" (Nesterov momentum) or "muon": Muon on the blocks' 2-D
                matrices, AdamW (at `lr`) on the embeddings, an untied head, gains and biases
                (`modules.optimizers.MuonAdamW`).
            muon_lr: Muon's peak learning rate; the schedule scales it like `lr`.
            momentum: Momentum of Muon and of SGD.
            lr_schedule: "cosine" (nanoGPT) or "wsd": warm-up, hold the peak, then decay linearly
                over the last `cooldown_frac` of lr_decay_steps (`modules.training.wsd_lr`).
            cooldown_frac: Share of lr_decay_steps the "wsd" schedule spends decaying.
            lr: Peak learning rate after warm-up (AdamW's, or SGD's).
            min_lr: Learning rate at the end of the decay; Muon's floor is the same fraction of muon_lr.
            warmup_steps: Linear warm-up steps.
            lr_decay_steps: Step where the cosine reaches min_lr; None means trainer.max_steps.
            weight_decay: AdamW decay, applied only to weights with >= 2 dimensions (matrices,
                embeddings), never to biases and LayerNorm gains.
            betas: AdamW betas.
            fused: Fused AdamW kernel; None uses it on CUDA only.
            compile: `torch.compile` the model (in place, so checkpoint keys do not change).
            sample_prompt: Prompt of the text samples logged at each validation and at the end.
            sample_tokens: Tokens per sample; 0 logs no samples.
            sample_temperature, sample_top_k, sample_seed: Sampling settings of those samples.
            eval_block_sizes: Context lengths at which the test split is scored again after the
                usual test (Press et al.'s extrapolation test: non-overlapping windows of each
                length), logged as test/loss_ctx{L} (every token) and test/loss_ctx{L}_tail (the
                tokens at positions >= the training block_size). Lengths a learned position table
                cannot reach are logged as NaN, and said so, instead of failing the run.
        """
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if eval_block_sizes is not None and any(not isinstance(t, int) or t <= 1 for t in eval_block_sizes):
            raise ValueError(f"eval_block_sizes must be context lengths > 1, got {eval_block_sizes}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {lr_schedule!r}")
        if muon_lr <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need muon_lr > 0 and 0 <= momentum < 1, got muon_lr={muon_lr}, momentum={momentum}")
        if lr_decay_steps is not None and lr_decay_steps < warmup_steps:
            raise ValueError(f"lr_decay_steps ({lr_decay_steps}) must be >= warmup_steps ({warmup_steps})")
        self.model: GPT | None = None
        self.tokenizer: Tokenizer | None = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._moe_sum: torch.Tensor | None = None  # (layers, 4 + E) stats summed since last log
        self._moe_total: torch.Tensor | None = None  # same, over the whole fit (for the heatmap)
        self._moe_n = 0
        self._moe_total_n = 0
        if vocab_size is not None and block_size is not None:
            self._build()
        else:
            self.model_config()  # validate the other fields now, not after data loading

    # -- model -----------------------------------------------------------------------------
    def model_config(self) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(GPTConfig)}
        kwargs = {k: v for k, v in self.hparams.items() if k in names}
        # placeholders only for validation before the datamodule has told us the real values
        kwargs["vocab_size"] = kwargs.get("vocab_size") or 1
        kwargs["block_size"] = kwargs.get("block_size") or 1
        return GPTConfig(**kwargs)

    def _build(self) -> None:
        self.model = GPT(self.model_config())
        if self.hparams.compile:
            self.model.compile()

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            if self.hparams.vocab_size is not None and self.hparams.vocab_size != tok.vocab_size:
                raise ValueError(
                    f"model vocab_size={self.hparams.vocab_size} but the datamodule's tokenizer has "
                    f"{tok.vocab_size} tokens; leave vocab_size unset to take it from the data"
                )
            self.tokenizer = tok
            self.hparams.vocab_size = tok.vocab_size  # saved with the checkpoint hyper-parameters
        data_block = getattr(dm, "block_size", None)
        if self.hparams.block_size is None:
            self.hparams.block_size = data_block
        elif data_block is not None and data_block > self.hparams.block_size:
            raise ValueError(
                f"datamodule block_size={data_block} exceeds the model's block_size={self.hparams.block_size}; "
                "leave the model's block_size unset to take it from the data"
            )
        if self.hparams.vocab_size is None or self.hparams.block_size is None:
            raise ValueError(
                "GPTModule needs vocab_size and block_size: pass them, or use a datamodule with "
                "`tokenizer` and `block_size` attributes (ShakespeareDataModule)"
            )
        if self.model is None:
            self._build()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    # -- checkpoint: the tokenizer travels with the weights ----------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_state(checkpoint["tokenizer"])

    # -- training --------------------------------------------------------------------------
    def tokens_per_batch(self, batch) -> int:
        return batch[0].numel()

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        # Lightning only sends on_step values to the logger every log_every_n_steps steps, but
        # self.log costs ~0.5 ms of Python on every call (2% of a CPU step here): call it only then.
        log_now = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        if log_now:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        if not self.model.moe_layers():
            return loss
        self._accumulate_moe()
        if log_now:
            self._log_moe()
        return loss + self.model.aux_loss()

    def _accumulate_moe(self) -> None:
        stats = torch.stack([m.last_stats for _, m in self.model.moe_layers()])  # (layers, 4 + E)
        self._moe_sum = stats if self._moe_sum is None else self._moe_sum + stats
        self._moe_total = stats.clone() if self._moe_total is None else self._moe_total + stats
        self._moe_n += 1
        self._moe_total_n += 1

    def _log_moe(self) -> None:
        """Per-layer and run-level (mean over layers) routing statistics since the last log."""
        mean = (self._moe_sum / self._moe_n).cpu()
        metrics = {}
        for row, (layer, _) in zip(mean, self.model.moe_layers()):
            for j, name in enumerate(STAT_NAMES):
                metrics[f"moe/layer{layer}/{name}"] = row[j]
            for e, frac in enumerate(row[len(STAT_NAMES):]):
                metrics[f"moe/layer{layer}/expert{e}_frac"] = frac
        for j, name in enumerate(STAT_NAMES):
            metrics[f"moe/{name}"] = mean[:, j].mean()
        self.log_dict(metrics, on_step=True, on_epoch=False)
        self._moe_sum, self._moe_n = None, 0

    def configure_optimizers(self):
        # CharRNNModule borrows this method with hyper-parameters of its own: what it lacks (the
        # optimizer's kind, the schedule's) takes this class's defaults, AdamW with the cosine.
        hp = SimpleNamespace(**{**init_defaults(GPTModule), **self.hparams})
        fused = hp.fused if hp.fused is not None else self.device.type == "cuda"
        opt = build_optimizer(self.model.named_parameters(), hp.optimizer, hp.lr, hp.weight_decay, tuple(hp.betas),
                              hp.momentum, hp.muon_lr, is_hidden_matrix, fused or None)
        decay_steps = hp.lr_decay_steps
        if decay_steps is None:
            decay_steps = self.trainer.max_steps if self._trainer is not None else -1
            if decay_steps is None or decay_steps < 0:
                raise ValueError("set lr_decay_steps or trainer.max_steps: the cosine schedule needs an end")
        return {"optimizer": opt, "lr_scheduler": lr_schedule(opt, hp.warmup_steps, decay_steps, hp.min_lr / hp.lr,
                                                              hp.lr_schedule, hp.cooldown_frac)}

    # -- evaluation ------------------------------------------------------------------------
    def _score(self, batch, metric: MeanMetric) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        # every window holds block_size targets, so weighting by windows is weighting by tokens
        metric.update(loss, weight=x.size(0))

    def validation_step(self, batch, batch_idx):
        self._score(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        log_mean_loss(self, "val", self.val_loss)
        if not self.trainer.sanity_checking:
            self._log_sample(f"samples/step_{self.global_step:06d}.txt")

    def test_step(self, batch, batch_idx):
        self._score(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        log_mean_loss(self, "test", self.test_loss)
        if self.hparams.eval_block_sizes:
            self._log_long_context()

    @torch.no_grad()
    def _log_long_context(self) -> None:
        """The test split scored in non-overlapping windows of each eval_block_sizes length."""
        data = getattr(self.trainer.datamodule, "test_data", None)
        if data is None:
            raise ValueError("eval_block_sizes needs a datamodule with a test split (`test_data`, "
                             "e.g. ShakespeareDataModule(test_fraction=0.05))")
        trained = self.hparams.block_size
        limit = self.model.max_positions
        batch = getattr(self.trainer.datamodule, "val_batch_size", 32)
        metrics = {}
        for length in self.hparams.eval_block_sizes:
            key = f"test/loss_ctx{length}"
            if limit is not None and length > limit:
                rank_zero_warn(f"{key}: pos_emb='{self.hparams.pos_emb}' has {limit} position rows and cannot "
                               f"score {length}-token windows; logged as NaN")
                metrics[key] = metrics[f"{key}_tail"] = float("nan")
                continue
            if len(data) <= length + 1:
                raise ValueError(f"the test split has {len(data)} tokens, too few for a {length}-token window")
            x, y = consecutive_windows(data, length)
            total = torch.zeros(length, dtype=torch.float64, device=self.device)  # summed loss per position
            for i in range(0, len(x), batch):
                xb, yb = x[i : i + batch].to(self.device), y[i : i + batch].to(self.device)
                logits, _ = self.model(xb)
                loss = F.cross_entropy(logits.transpose(1, 2).float(), yb, reduction="none")  # (b, T)
                total += loss.sum(0).double()
            per_pos = total / len(x)
            metrics[key] = per_pos.mean().item()
            metrics[f"{key}_tail"] = per_pos[trained:].mean().item() if length > trained else float("nan")
        self.log_dict(metrics, sync_dist=False)

    def on_fit_start(self) -> None:
        # params/active counts embeddings like the pipeline's params/total; the FLOPs estimate
        # uses the non-embedding count, as in Kaplan et al.
        metrics = {"params/active": float(self.model.num_active_params(non_embedding=False)),
                   "gpt/flops_per_token": float(self.model.flops_per_token())}
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=0)

    def on_train_end(self) -> None:
        self._log_sample("samples/final.txt")
        self._log_generation()
        if self._moe_total is not None:
            self._log_heatmap()

    @torch.no_grad()
    def _log_generation(self) -> None:
        """KV-cache size, measured from the cache tensors of one block_size-long sequence, and
        greedy generation speed with the cache (batch 1, block_size - 1 new tokens)."""
        if not self.trainer.is_global_zero:
            return
        bs = self.hparams.block_size
        was_training = self.model.training
        self.model.eval()
        try:
            idx = torch.zeros(1, bs, dtype=torch.long, device=self.device)
            _, cache = self.model._forward(idx)
            dtype = cache.layers[0][0].dtype
            self.model.generate(idx[:, :1], min(8, bs - 1), temperature=0.0)  # warm-up
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.model.generate(idx[:, :1], bs - 1, temperature=0.0)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        finally:
            self.model.train(was_training)
        metrics = {
            "gen/kv_cache_bytes": float(cache.nbytes()),  # one sequence at block_size
            "gen/kv_bytes_per_token": float(cache.bytes_per_token()),
            "gen/kv_bytes_per_token_formula": float(self.model.kv_bytes_per_token_formula(dtype)),
            "gen/tokens_per_s": (bs - 1) / elapsed if bs > 1 else float("nan"),
        }
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _log_sample(self, artifact_file: str) -> None:
        hp = self.hparams
        if hp.sample_tokens <= 0 or self.tokenizer is None or not self.trainer.is_global_zero:
            return
        text = self.generate_text(hp.sample_prompt, hp.sample_tokens, hp.sample_temperature, hp.sample_top_k, hp.sample_seed)
        log_text(self.loggers, text, artifact_file)

    def _log_heatmap(self) -> None:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

        util = (self._moe_total / self._moe_total_n)[:, len(STAT_NAMES):].cpu().numpy()  # (layers, E)
        layers = [i for i, _ in self.model.moe_layers()]
        fig = Figure(figsize=(1 + 0.5 * util.shape[1], 1 + 0.4 * len(layers)))
        ax = fig.add_subplot()
        im = ax.imshow(util, cmap="viridis", aspect="auto", vmin=0.0)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_title("fraction of routed assignments (training mean)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        log_figure(self.loggers, fig, "moe/expert_utilization.png")

    # -- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(
        self, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0
    ) -> str:
        """Prompt plus max_new_tokens sampled tokens, decoded; same seed, same text."""
        if self.tokenizer is None or self.model is None:
            raise RuntimeError("no tokenizer/model: load a checkpoint saved by a fit, or call trainer.fit first")
        ids = self.tokenizer.encode(prompt or "\n")
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens; give a non-empty prompt")
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(idx, max_new_tokens, temperature, top_k, generator=g)
        finally:
            self.model.train(was_training)
        return self.tokenizer.decode(out[0].tolist())
