"""Causal-LM fine-tuning, fully or by a parameter-efficient method, on a Hugging Face model or the mini-GPT.

The method is chosen when the module is built, from one table (`modules.finetune.methods`):
`full` trains every weight; the others freeze the base and train their own small part (LoRA,
QLoRA over a 4-bit NF4 base, DoRA, IA3, VeRA, LoHa, prefix and prompt tuning through PEFT, and
Houlsby's bottleneck adapter by hand). Validation runs once before the first step
(`val/loss_before`, `val/ppl_before`) and as usual afterwards (`val/loss`, `val/ppl`). After
training, the adapter alone and, where it folds into the weights, the merged model are exported
and logged as artifacts with their sizes on disk (`modules.finetune.export`).

Construction only checks and stores the arguments, so a config instantiates offline in
milliseconds. The work waits for Lightning's hooks: `configure_model` loads the weights and wraps
them (inside the strategy's init contexts, so FSDP/DeepSpeed can shard large models). Outside a
Trainer, call `configure_model()` yourself; `load_for_generation` and `load_from_checkpoint` do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from contract import CountsTokens, TextGenerator, TransformersExport
from modules.finetune.backbone import (
    load_hf,
    load_minigpt,
    load_tokenizer,
    require_cuda_4bit,
    resolve_backbone,
    torch_dtype,
)
from modules.finetune.export import export_and_log, save_adapter, save_merged
from modules.finetune.methods import MethodArgs, lookup
from modules.finetune.model import (
    MiniGPTForCausalLM,
    causal_lm_loss,
    default_lr,
    logits_of,
    quantize_nf4_,
    sample,
    unwrap,
)
from modules.training import cosine_schedule, log_mean_loss


class FinetuneModule(L.LightningModule, TextGenerator, CountsTokens, TransformersExport):
    def __init__(
        self,
        backbone: str | None = None,
        method: str = "lora",
        r: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        use_dora: bool = False,
        num_virtual_tokens: int = 16,
        lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        export: bool = True,
        export_dir: str | None = None,
    ):
        """Fine-tune a causal LM fully or with a parameter-efficient method.

        Args:
            backbone: A Hugging Face hub id or model folder, or a mini-GPT checkpoint (.ckpt or a
                folder holding one). In a config, "runs:/<run id>" names the run that trained it
                (the pipeline fetches the checkpoint: the lora-vs-full study's `base` stage).
                None only parses: running needs a backbone.
            method: A row of `modules.finetune.methods.METHODS`: "full", "lora", "qlora" (4-bit NF4
                base + LoRA; CUDA and bitsandbytes), "dora", "ia3", "vera", "loha", "prefix",
                "prompt" (Hugging Face backbones) or "adapter" (Houlsby's bottleneck).
            r: Rank of lora/dora/vera/loha; the bottleneck adapter's width.
            lora_alpha: LoRA/LoHa scale numerator (update = alpha / r * B A); None means 2 r.
            lora_dropout: Dropout on the LoRA (VeRA) branch input.
            target_modules: Module names the method wraps; None means the method's default (all
                linear projections for the low-rank methods, the sublayers' outputs for adapter).
            use_dora: LoRA with DoRA's magnitude (method "dora" is lora with this set).
            num_virtual_tokens: Trained tokens that prefix and prompt tuning prepend.
            lr: AdamW learning rate; None means the practitioners' default for the method and
                model size (`modules.finetune.model.default_lr`).
            weight_decay: AdamW weight decay on the trained parameters.
            warmup_steps: Linear warm-up steps before the cosine decay.
            min_lr_ratio: The cosine decays to lr * min_lr_ratio at the last step.
            dtype: Weights dtype: "float32", "bfloat16", "float16" or "auto" (Hugging Face only).
            gradient_checkpointing: Recompute activations in backward (Hugging Face models).
            attn_implementation: Hugging Face attention kernel ("eager", "sdpa", "flash_attention_2").
            trust_remote_code: Allow a hub model's own modelling code.
            export: After training, save the adapter and the merged model and log them.
            export_dir: Keep the exports here (adapter/, merged/); None: a temporary folder
                that is removed once the artifacts are logged.
        """
        super().__init__()
        self.save_hyperparameters()
        self.spec = lookup(method, use_dora, gradient_checkpointing)  # the method's row; checks what it allows
        if lr is not None and lr <= 0:
            raise ValueError(f"FinetuneModule.lr must be > 0 or None (method default), got {lr}")
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError("FinetuneModule.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        torch_dtype(dtype)  # validates the name early
        self.method = method
        self.export, self.export_dir = export, export_dir
        # Only what needs neither the network nor training is settled here: a local path must be a
        # checkpoint or a model folder; a hub id is just a name. The weights wait for configure_model.
        self.kind, self.source = ("minigpt", None) if backbone is None else resolve_backbone(backbone)
        if self.kind == "minigpt" and dtype == "auto":
            raise ValueError("FinetuneModule.dtype='auto' is for Hugging Face models; use 'float32' or 'bfloat16'")
        # the method's config, made (and so checked: rank, dropout, backbone kind) now, applied in configure_model
        args = MethodArgs(r, lora_alpha, lora_dropout, target_modules, use_dora, num_virtual_tokens, self.kind == "minigpt")
        self.adapter = self.spec.configure(args) if self.spec.configure else None
        self.backbone: torch.nn.Module | None = None  # built by configure_model
        self._tokenizer: Any = None
        self.n_total = self.n_trainable = 0
        self.lr = lr  # None: the method's default, known once configure_model has counted the weights
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    # ------------------------------------------------------------------ building

    def _resolve(self) -> str:
        """The backbone's local checkpoint, folder or hub id."""
        if self.source is None:
            raise ValueError(
                "FinetuneModule has no backbone: set model.init_args.backbone to a Hugging Face id or folder, a "
                "mini-GPT .ckpt, or runs:/<run id> of a mini-GPT run (the lora-vs-full study trains one as its "
                "`base` stage: practicum study configs/studies/lora-vs-full.yaml)"
            )
        return self.source

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer, loaded without its weights (a data module needs it in `setup`,
        before Lightning calls `configure_model`)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.kind, self._resolve(), self.hparams.trust_remote_code)
        return self._tokenizer

    def prepare_data(self) -> None:
        # a missing backbone, or QLoRA without CUDA, is an error before any data is prepared
        self._resolve()
        if self.spec.quantize:
            require_cuda_4bit()

    def configure_model(self) -> None:
        """Build the backbone: load (and quantise) the base, wrap it with LoRA, count parameters.

        Lightning calls this before fit/validate/test inside the strategy's init contexts (so
        FSDP/DeepSpeed can shard at init), after the `setup` hooks, and `load_from_checkpoint`
        calls it before loading the state dict. Idempotent: later calls keep the first model.
        """
        if self.backbone is None:
            self._build()
        dm = self._trainer.datamodule if self._trainer is not None else None
        length = getattr(dm, "max_length", None)
        if self.max_length is not None and length is not None and length > self.max_length:
            raise ValueError(
                f"data max_length={length} exceeds the mini-GPT's block_size={self.max_length}; "
                f"set --data.init_args.max_length={self.max_length} or less"
            )

    def _build(self) -> None:
        self.backbone = self.build(self._load_base(quantize=self.spec.quantize))
        self.n_total = sum(p.numel() for p in self.backbone.parameters())
        self.n_trainable = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        if self.lr is None:
            self.lr = default_lr(self.method, self.n_total)

    def build(self, base: torch.nn.Module) -> torch.nn.Module:
        """The model this module trains, made from a loaded base by the method: the one builder.

        `configure_model` calls it on the loaded weights; `practicum estimate` on the same
        architecture built on the meta device (`modules.finetune.memory.estimate`), so the
        estimate counts the very parameters that train.
        """
        h = self.hparams
        if self.spec.quantize and self.kind == "hf":  # fp32 norms and embeddings, input grads for checkpointing
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=h.gradient_checkpointing)
        backbone = base if self.adapter is None else self.spec.attach(base, self.adapter)
        if h.gradient_checkpointing and self.kind == "hf":
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.kind == "hf" and hasattr(backbone, "config"):
            backbone.config.use_cache = False  # no KV cache while training
        return backbone.train()  # from_pretrained hands models back in eval mode

    def _load_base(self, quantize: bool = False) -> torch.nn.Module:
        h = self.hparams
        source = self._resolve()  # also settles the kind of a run-id backbone
        if quantize:
            require_cuda_4bit()
        if self.kind == "hf":
            return load_hf(source, h.dtype, h.attn_implementation, quantize, h.trust_remote_code)
        gpt = load_minigpt(source).to(torch_dtype(h.dtype))
        if quantize:
            gpt = quantize_nf4_(gpt)
        return MiniGPTForCausalLM(gpt, name_or_path=source)

    @property
    def max_length(self) -> int | None:
        """Longest sequence the built backbone accepts (the mini-GPT's block_size), None if unbounded here."""
        if self.kind == "minigpt" and self.backbone is not None:
            return unwrap(self.backbone).block_size
        return None

    # ------------------------------------------------------------------ training

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.backbone is None:
            raise RuntimeError(
                "FinetuneModule has no backbone yet: the Trainer builds it (configure_model) in fit/validate/test; "
                "outside one call module.configure_model() first, or use load_for_generation"
            )
        return logits_of(self.backbone, input_ids, attention_mask)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(self(batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def _score(self, batch: dict[str, torch.Tensor], metric: MeanMetric) -> None:
        loss, n = self._loss(batch)
        metric.update(loss, n)  # token-weighted: the epoch value is the mean over tokens

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, self.val_nll)

    def on_validation_epoch_end(self) -> None:
        log_mean_loss(self, "val", self.val_nll)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._score(batch, self.test_nll)

    def on_test_epoch_end(self) -> None:
        log_mean_loss(self, "test", self.test_nll)

    def tokens_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        """Token-mean validation loss of the current weights over `loader` (eval mode)."""
        was_training = self.training
        self.eval()
        total, count = torch.zeros((), device=self.device), 0
        limit = self.trainer.limit_val_batches if self._trainer is not None else 1.0
        n_batches = limit if isinstance(limit, int) else math.ceil(len(loader) * limit)
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss, n = self._loss(batch)
            total += loss * n
            count += n
        self.train(was_training)
        if self._trainer is None:
            return float(total / max(count, 1))
        stats = self.all_gather(torch.stack([total, torch.tensor(float(count), device=self.device)]))
        stats = stats.reshape(-1, 2).sum(0)
        return float(stats[0] / stats[1].clamp_min(1))

    def _log_now(self, metrics: dict[str, float]) -> None:
        """Straight to the loggers (and callback_metrics): Lightning's self.log in fit-level
        hooks only flushes at epoch end, and these values belong to step 0 / the end of fit."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def on_train_start(self) -> None:
        metrics = {
            "params/trainable": float(self.n_trainable),
            "params/trainable_pct": 100.0 * self.n_trainable / self.n_total,
            "finetune/lr": self.lr,
        }
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_dataloader") and self.trainer.limit_val_batches != 0:
            before = self.evaluate(dm.val_dataloader())
            metrics.update({"val/loss_before": before, "val/ppl_before": math.exp(min(before, 80.0))})
        self._log_now(metrics)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.999))
        h = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": cosine_schedule(opt, h.warmup_steps, total, h.min_lr_ratio)}

    # ------------------------------------------------------------------ checkpoints

    def _frozen_keys(self) -> list[str]:
        return [n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.method == "full":
            return
        frozen = tuple(self._frozen_keys())
        # frozen weights (and a 4-bit layer's quantisation state, saved as "<weight>.<stat>")
        # come back from the backbone spec; only the adapters are state worth saving
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k in frozen or k.startswith(tuple(f + "." for f in frozen))]:
            del sd[k]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()  # already built by load_from_checkpoint and by the Trainer; a no-op then
        sd = checkpoint["state_dict"]
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = trained - set(sd)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {sorted(missing)[:3]}")
        # a LoRA checkpoint holds the adapters only: the frozen base this module was just rebuilt
        # from `backbone` fills in the rest, so loading stays strict
        for k, v in self.state_dict().items():
            sd.setdefault(k, v)

    # ------------------------------------------------------------------ export and generation

    def on_train_end(self) -> None:
        if self.export and self.trainer.global_rank == 0:
            export_and_log(self, self.export_dir)

    def save_adapter(self, folder: str | Path) -> Path:
        """The trained adapter alone, in PEFT's format (`modules.finetune.export.save_adapter`)."""
        return save_adapter(self, folder)

    def save_merged(self, folder: str | Path) -> Path:
        """A standalone model with the adapter folded in (`modules.finetune.export.save_merged`)."""
        return save_merged(self, folder)

    def export_transformers(self, folder: str | Path) -> Path | None:
        """`contract.TransformersExport`: the merged model as a transformers folder; None for a mini-GPT."""
        return self.save_merged(folder) if self.kind == "hf" else None

    @torch.no_grad()
    def generate_text(
        self, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0
    ) -> str:
        """The prompt followed by up to max_new_tokens sampled tokens, decoded (like GPTModule's)."""
        from datamodules.tokenizers import encode, special_ids

        self.configure_model()
        bos, eos, pad = special_ids(self.tokenizer)
        ids = ([bos] if bos is not None else []) + encode(self.tokenizer, prompt)
        if not ids:
            raise ValueError("generate_text needs a non-empty prompt for this tokenizer")
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        was_training = self.training
        self.eval()
        try:
            new = sample(self.backbone, x, max_new_tokens, temperature, top_k, seed, eos, pad)
        finally:
            self.train(was_training)
        all_ids = ids + new[0].tolist()
        if self.kind == "hf":
            return self.tokenizer.decode(all_ids, skip_special_tokens=True)
        return self.tokenizer.decode(all_ids)

