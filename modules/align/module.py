"""Direct Preference Optimisation of a causal LM: the mini-GPT or a Hugging Face model.

`DPOModule` is a `FinetuneModule` (same backbones, loaders, LoRA through PEFT, optimiser, exports)
whose objective is DPO's (`objective.py`) on batches of preference pairs
(`datamodules.preference.PreferenceDataModule`). The reference policy pi_ref is the backbone as
loaded, the supervised model: with `method="full"` a frozen copy of it, with LoRA the same weights
with the adapters switched off (PEFT's `disable_adapter`, as TRL does), so no second copy exists.

Logged, per split (train/val/test), under TRL's names: `loss` (the DPO loss, log 2 at step 0),
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
`logps/rejected`. At the end of each validation and test, completions are sampled from the policy
for the data module's held-out prompts (temperature 1, no top-k, so they are draws from pi itself):
`kl` is the Monte-Carlo sequence KL(pi || pi_ref) on them and `true_reward` the mean of the data
module's programmatic reward (VADER sentiment) over them: the two axes of the DPO paper's
reward-KL frontier. `best_of=n` keeps the best of n draws per sample by that reward (the best-of-n
baseline); its KL adds log n - (n - 1) / n.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch

from datamodules.preference import pad_rows
from datamodules.tokenizers import encode, special_ids
from modules.align.objective import (
    best_of_n_kl,
    dpo_loss,
    preference_metrics,
    sampled_kl,
    sequence_logps,
)
from modules.artifacts import log_text
from modules.finetune.model import logits_of, sample
from modules.finetune.module import FinetuneModule


class DPOModule(FinetuneModule):
    def __init__(
        self,
        backbone: str | None = None,
        method: str = "full",
        beta: float = 0.1,
        best_of: int = 1,
        eval_samples: int = 2,
        sample_batch_size: int = 512,
        export: bool = False,
        **kwargs: Any,
    ):
        """DPO on preference pairs, against the backbone as loaded (the supervised model).

        Args:
            backbone: As for `FinetuneModule`: a mini-GPT checkpoint (``runs:/<run id>`` of the run
                that trained it, in a config), or a Hugging Face model folder or hub id.
            method: "full" (reference: a frozen copy), "lora" or "qlora" (reference: the base with
                the adapters disabled).
            beta: DPO's beta, the weight of the KL penalty: larger keeps the policy nearer the reference.
            best_of: At evaluation, keep the best of this many draws per sample by the true reward
                (best-of-n sampling; 1: plain sampling). With no training steps this is the
                best-of-n baseline of the supervised model.
            eval_samples: Completions sampled per held-out prompt for `kl` and `true_reward`.
            sample_batch_size: Sequences generated (and scored) at once.
            export: Save and log the trained model after fit (see `FinetuneModule`).
            **kwargs: The other `FinetuneModule` arguments (r, lora_alpha, lr, warmup_steps, dtype, ...).
        """
        super().__init__(backbone=backbone, method=method, export=export, **kwargs)
        if beta <= 0:
            raise ValueError(f"DPOModule.beta must be > 0 (the KL penalty weight; DPO uses 0.01..1), got {beta}")
        for name, value in (("best_of", best_of), ("eval_samples", eval_samples),
                            ("sample_batch_size", sample_batch_size)):
            if value < 1:
                raise ValueError(f"DPOModule.{name} must be >= 1, got {value}")
        self.beta = beta
        self.reference: torch.nn.Module | None = None  # method="full": a frozen copy of the loaded backbone

    # ------------------------------------------------------------------ the reference policy

    def _build(self) -> None:
        super()._build()
        if self.method == "full":
            self.reference = copy.deepcopy(self.backbone).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # pi_ref is fixed: no dropout, ever
        return self

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[torch.nn.Module]:
        """pi_ref: the frozen copy, or the backbone with its adapters disabled for the duration."""
        self.configure_model()
        if self.reference is not None:
            yield self.reference
        else:
            with self.backbone.disable_adapter():
                yield self.backbone

    # ------------------------------------------------------------------ the objective

    def _logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logps(logits_of(model, batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    def _pair_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss and metrics of a batch whose first half holds the chosen answers, second the rejected."""
        logps = self._logps(self.backbone, batch)
        with torch.no_grad(), self.as_reference() as ref:
            ref_logps = self._logps(ref, batch)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        metrics = {"loss": loss.detach(), **preference_metrics(r_chosen, r_rejected),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        return loss, metrics

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        loss, _ = self._pair_step(batch)  # FinetuneModule.evaluate (val/loss_before) averages this
        return loss, batch["input_ids"].size(0) // 2

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._pair_step(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, prog_bar=False,
                      batch_size=batch["input_ids"].size(0) // 2)
        return loss

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        _, metrics = self._pair_step(batch)
        self.log_dict({f"{split}/{k}": v for k, v in metrics.items()}, on_epoch=True, sync_dist=True,
                      batch_size=batch["input_ids"].size(0) // 2)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_samples("val")

    def on_test_epoch_end(self) -> None:
        self._log_samples("test")

    def on_train_start(self) -> None:
        metrics = {"params/trainable": float(self.n_trainable), "finetune/lr": self.lr, "dpo/beta": self.beta}
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_dataloader") and self.trainer.limit_val_batches != 0:
            metrics["val/loss_before"] = self.evaluate(dm.val_dataloader())  # log 2: pi = pi_ref
        self._log_now(metrics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # pi_ref is the backbone as loaded: it comes back from the backbone spec, like a LoRA base
        for k in [k for k in checkpoint["state_dict"] if k.startswith("reference.")]:
            del checkpoint["state_dict"][k]

    # ------------------------------------------------------------------ sampling

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        bos, _, _ = special_ids(self.tokenizer)
        ids = [([bos] if bos is not None else []) + encode(self.tokenizer, p) for p in prompts]
        if any(not i for i in ids):
            raise ValueError("every prompt must encode to at least one token")
        return ids

    @torch.no_grad()
    def sample_ids(
        self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
        reference: bool = False,
    ) -> list[list[list[int]]]:
        """n completions (token ids, cut after EOS) per prompt, from the policy or from pi_ref.

        Prompts of equal length are generated together in batches of `sample_batch_size`.
        """
        self.configure_model()
        _, eos, pad = special_ids(self.tokenizer)
        limit = self.max_length
        longest = max(len(p) for p in prompt_ids)
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the mini-GPT's "
                             f"block_size={limit}; use shorter prompts or fewer new tokens")
        out: list[list[list[int]]] = [[] for _ in prompt_ids]
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompt_ids):
            by_length.setdefault(len(p), []).append(i)
        rows = [(i, j) for idx in by_length.values() for i in idx for j in range(n)]
        was_training = self.training
        self.eval()
        ctx = self.as_reference() if reference else contextlib.nullcontext(self.backbone)
        try:
            with ctx as model:
                start = 0
                while start < len(rows):
                    length = len(prompt_ids[rows[start][0]])
                    chunk = []
                    while start < len(rows) and len(prompt_ids[rows[start][0]]) == length \
                            and len(chunk) < self.hparams.sample_batch_size:
                        chunk.append(rows[start])
                        start += 1
                    x = torch.tensor([prompt_ids[i] for i, _ in chunk], dtype=torch.long, device=self.device)
                    new = sample(model, x, max_new_tokens, temperature, None, seed + start, eos, pad).tolist()
                    for (i, _), ids in zip(chunk, new):
                        out[i].append(ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids)
        finally:
            self.train(was_training)
        return out

    def sample_completions(
        self, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
        reference: bool = False,
    ) -> list[list[str]]:
        """n sampled completions (text) per prompt; `reference=True` draws from pi_ref (the data module
        builds preference pairs from the supervised model this way)."""
        ids = self.sample_ids(self._prompt_ids(prompts), n, max_new_tokens, temperature, seed, reference)
        skip = {"skip_special_tokens": True} if self.kind == "hf" else {}
        return [[self.tokenizer.decode(c, **skip) for c in per_prompt] for per_prompt in ids]

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(y|x), log pi_ref(y|x)) of each completion, each (N,)."""
        _, _, pad = special_ids(self.tokenizer)
        size = self.hparams.sample_batch_size
        pol, ref = [], []
        for s in range(0, len(completions), size):
            batch = pad_rows(prompt_ids[s : s + size], completions[s : s + size], pad)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            pol.append(self._logps(self.backbone, batch))
            with self.as_reference() as model:
                ref.append(self._logps(model, batch))
        return torch.cat(pol), torch.cat(ref)

    def _log_samples(self, split: str) -> None:
        """`kl` and `true_reward` of completions sampled from the policy for the split's held-out prompts."""
        dm = getattr(self.trainer, "datamodule", None)
        prompts = dm.eval_prompts(split) if hasattr(dm, "eval_prompts") else []
        if not prompts:
            return
        n, k = self.hparams.eval_samples, self.hparams.best_of
        prompt_ids = self._prompt_ids(prompts)
        seed = int(torch.randint(2**31 - 1, (), generator=torch.Generator().manual_seed(torch.initial_seed())))
        was_training = self.training
        self.eval()
        try:
            drawn = self.sample_ids(prompt_ids, n * k, dm.max_new_tokens, 1.0, seed)
            flat_prompts = [p for p, cs in zip(prompt_ids, drawn) for _ in cs]
            flat = [c for cs in drawn for c in cs]
            policy, ref = self.score(flat_prompts, flat)
        finally:
            self.train(was_training)
        metrics = {f"{split}/kl": float(sampled_kl(policy, ref)) + best_of_n_kl(k)}
        reward = getattr(dm, "reward", None)
        if reward is not None:
            skip = {"skip_special_tokens": True} if self.kind == "hf" else {}
            texts = [self.tokenizer.decode(c, **skip) for c in flat]
            scores = torch.tensor(reward(texts), dtype=torch.float64)
            best = scores.view(len(prompts), n, k).amax(-1)  # best of k draws for each of n samples
            metrics[f"{split}/true_reward"] = float(best.mean())
            if self.trainer.is_global_zero:  # what the numbers are about: the first samples, scored
                shown = [f"{s:+.3f}  {p!r} -> {t!r}" for p, t, s in zip(
                    [pr for pr, cs in zip(prompts, drawn) for _ in cs], texts, scores.tolist())][: 4 * n * k]
                log_text(self.loggers, "\n".join(shown) + "\n", f"samples/{split}_step_{self.global_step:06d}.txt")
        self.log_dict(metrics, sync_dist=True)

