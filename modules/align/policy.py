"""The policy of RLHF: a causal LM fine-tuned away from a frozen reference, sampled and scored.

`PolicyModule` is a `FinetuneModule` (same backbones, LoRA through PEFT, optimiser, exports) that
every method of the `rlhf` study shares: DPO, PPO and RLOO subclass it, and with no training steps
it is the supervised model itself or its best-of-n. The reference policy pi_ref is the backbone as
loaded (the supervised model): with `method="full"` a frozen copy of it, with LoRA the same weights
with the adapters switched off (PEFT's `disable_adapter`, as TRL does), so no second copy exists.

At the end of each validation and test, completions are sampled from the policy for the data
module's held-out prompts (temperature 1, no top-k, so they are draws from pi itself) and logged:
`kl`, the Monte-Carlo sequence KL(pi || pi_ref) on them; `true_reward`, the mean of the data
module's programmatic reward (VADER: the gold reward); and, with a `reward_model`, `proxy_reward`,
the learned reward model's mean score. `best_of=n` keeps the best of n draws per sample, by the
gold reward or by the reward model (`best_of_by`); its KL adds log n - (n - 1) / n.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch

from datamodules.text import pad_rows
from datamodules.tokenizers import encode, special_ids
from modules.align.objective import best_of_n_kl, sampled_kl, sequence_logps
from modules.artifacts import log_text
from modules.finetune.model import logits_of, sample
from modules.finetune.module import FinetuneModule

BEST_OF_BY = ("gold", "proxy")


class PolicyModule(FinetuneModule):
    def __init__(
        self,
        backbone: str | None = None,
        method: str = "full",
        reward_model: str | None = None,
        best_of: int = 1,
        best_of_by: str = "gold",
        eval_samples: int = 2,
        sample_batch_size: int = 512,
        export: bool = False,
        **kwargs: Any,
    ):
        """A policy against the backbone as loaded (the supervised model).

        Args:
            backbone: As for `FinetuneModule`: a mini-GPT checkpoint (``runs:/<run id>`` of the run
                that trained it, in a config), or a Hugging Face model folder or hub id.
            method: "full" (reference: a frozen copy), "lora" or "qlora" (reference: the base with
                the adapters disabled).
            reward_model: The learned reward model (the reward stage's ``runs:/<run id>/reward/model.ckpt``):
                its score of the samples is logged as `proxy_reward`; None: no proxy reward.
            best_of: At evaluation, keep the best of this many draws per sample (best-of-n
                sampling; 1: plain sampling). With no training steps this is the best-of-n
                baseline of the supervised model.
            best_of_by: "gold" (the data module's reward picks: an oracle) or "proxy" (the reward model).
            eval_samples: Completions sampled per held-out prompt for `kl` and the rewards.
            sample_batch_size: Sequences generated (and scored) at once.
            export: Save and log the trained model after fit (see `FinetuneModule`).
            **kwargs: The other `FinetuneModule` arguments (r, lora_alpha, lr, warmup_steps, dtype, ...).
        """
        super().__init__(backbone=backbone, method=method, export=export, **kwargs)
        for name, value in (("best_of", best_of), ("eval_samples", eval_samples),
                            ("sample_batch_size", sample_batch_size)):
            if value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {value}")
        if best_of_by not in BEST_OF_BY:
            raise ValueError(f"{type(self).__name__}.best_of_by must be one of {BEST_OF_BY}, got {best_of_by!r}")
        if best_of_by == "proxy" and reward_model is None:
            raise ValueError(f"{type(self).__name__}.best_of_by='proxy' picks by the reward model: set reward_model")
        self.reward_model_path = reward_model
        self.reference: torch.nn.Module | None = None  # method="full": a frozen copy of the loaded backbone
        self.reward_model: torch.nn.Module | None = None  # frozen, built with the backbone

    # ------------------------------------------------------------------ the reference policy

    def _build(self) -> None:
        super()._build()
        if self.method == "full":
            self.reference = copy.deepcopy(self.backbone).requires_grad_(False).eval()
        if self.reward_model_path is not None:
            from modules.align.reward import load_reward_model

            self.reward_model, _ = load_reward_model(self.reward_model_path)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.eval()  # pi_ref and the reward model are fixed: no dropout, ever
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

    def _logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logps(logits_of(model, batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    # evaluation is the sampling at the end of the epoch: batches of prompts need no step (DPO scores its pairs)
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def test_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_samples("val")

    def on_test_epoch_end(self) -> None:
        self._log_samples("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # pi_ref and the reward model come back from their specs, like a LoRA base
        for k in [k for k in checkpoint["state_dict"] if k.startswith(("reference.", "reward_model."))]:
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

    @torch.no_grad()
    def proxy_scores(self, prompt_ids: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """The reward model's r(x, y) of each completion, (N,)."""
        if self.reward_model is None:
            raise ValueError(f"{type(self).__name__} has no reward_model to score with")
        _, _, pad = special_ids(self.tokenizer)
        size, out = self.hparams.sample_batch_size, []
        for s in range(0, len(completions), size):
            batch = pad_rows(prompt_ids[s : s + size], completions[s : s + size], pad)
            out.append(self.reward_model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)))
        return torch.cat(out).double()

    def gold_scores(self, completions: list[list[int]]) -> torch.Tensor | None:
        """The data module's programmatic reward (VADER) of each decoded completion, (N,); None without one."""
        reward = getattr(getattr(self._trainer, "datamodule", None), "reward", None)
        if reward is None:
            return None
        skip = {"skip_special_tokens": True} if self.kind == "hf" else {}
        return torch.tensor(reward([self.tokenizer.decode(c, **skip) for c in completions]), dtype=torch.float64)

    def _log_samples(self, split: str) -> None:
        """`kl`, `true_reward` and `proxy_reward` of samples from the policy for the split's held-out prompts."""
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
            proxy = self.proxy_scores(flat_prompts, flat) if self.reward_model is not None else None
        finally:
            self.train(was_training)
        gold = self.gold_scores(flat)
        picker = proxy if self.hparams.best_of_by == "proxy" else gold
        # best of k draws for each of n samples: the index of the kept draw, (P, n)
        pick = picker.view(len(prompts), n, k).argmax(-1) if picker is not None and k > 1 else None

        def kept(scores: torch.Tensor) -> torch.Tensor:
            s = scores.view(len(prompts), n, k)
            return s[..., 0] if pick is None else s.gather(-1, pick.unsqueeze(-1)).squeeze(-1)

        # KL of the policy itself (every draw), plus best-of-n's own (Stiennon et al. 2020, appendix G.3)
        metrics = {f"{split}/kl": float(sampled_kl(policy, ref)) + best_of_n_kl(k)}
        if gold is not None:
            metrics[f"{split}/true_reward"] = float(kept(gold).mean())
        if proxy is not None:
            metrics[f"{split}/proxy_reward"] = float(kept(proxy).mean())
        if gold is not None and self.trainer.is_global_zero:  # what the numbers are about: the first samples
            skip = {"skip_special_tokens": True} if self.kind == "hf" else {}
            shown = [f"{s:+.3f}  {self.tokenizer.decode(p, **skip)!r} -> {self.tokenizer.decode(c, **skip)!r}"
                     for p, c, s in zip(flat_prompts, flat, gold.tolist())][: 4 * n * k]
            log_text(self.loggers, "\n".join(shown) + "\n", f"samples/{split}_step_{self.global_step:06d}.txt")
        self.log_dict(metrics, sync_dist=True)
