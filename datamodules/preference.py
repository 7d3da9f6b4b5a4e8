"""Prompts and preference pairs (prompt, chosen, rejected), for the RLHF and DPO modules.

The controlled-sentiment task of the DPO paper (Rafailov et al. 2023, section 6.1) in three parts:

1. `PromptDataModule`: prompts are the openings of lines of a corpus (the Shakespeare plays, which
   the supervised mini-GPT learned), split into train / val / test, with the programmatic reward
   that scores continuations. On-policy methods (PPO, RLOO) train on its prompts; the pairs stage
   samples from them.
2. The pairs stage (`modules.align.pairs.PairSampler`, configs/align/pairs_minigpt.yaml): the
   supervised model samples `samples_per_prompt` continuations of each prompt, the reward scores
   them, and the best and the worst make the prompt's (chosen, rejected) pair (`best_and_worst`).
   It writes them to a JSON-lines artifact; nothing here samples, so no datamodule reaches into
   the model it feeds.
3. `PreferenceDataModule` reads pairs: that JSON-lines file (a ``split`` column keeps the stage's
   splits, ``score_chosen`` / ``score_rejected`` let `min_margin` drop ties and near-ties), or any
   preference dataset with ``prompt``, ``chosen`` and ``rejected`` columns (names mappable with
   `fields`): a .jsonl / .json / .csv / .parquet file, or what ``datasets.load_dataset`` reads.

The reward is VADER's sentiment (Hutto & Gilbert 2014): the `compound` score in [-1, 1] of a
rule-based lexicon of ~7,500 human-rated words shipped inside the `vaderSentiment` wheel, so
anyone can read why a text scored what it did (``SentimentIntensityAnalyzer().polarity_scores``).
Data without a programmatic reward (`reward=None`) gets no `true_reward` from the modules.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from contract import OptionalTestSplit
from datamodules.text import (
    TABLE_SUFFIXES,
    BorrowedTokenizer,
    check_holdout,
    load_hf_dataset,
    pad_rows,
    read_table,
    split_holdout,
)
from datamodules.tokenizers import encode, special_ids

REWARDS = ("vader",)
FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
SPLITS = ("train", "val", "test")


class VaderReward:
    """VADER's compound sentiment score of each text, in [-1, 1] (positive: a happier text)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(t)["compound"] for t in texts]


def make_reward(name: str | None) -> Callable[[list[str]], list[float]] | None:
    """"vader", the dotted import path of a function (texts -> scores), or None."""
    if name is None:
        return None
    if name == "vader":
        return VaderReward()
    module, _, attr = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError):
        fn = None
    if not callable(fn):
        raise ValueError(f"reward must be one of {REWARDS}, the dotted path of a function list[str] -> list[float] "
                         f"(e.g. mypkg.rewards.length), or null; got {name!r}")
    return fn


def corpus_prompts(n_prompts: int, n_eval_prompts: int, prompt_chars: int, train_frac: float,
                   seed: int) -> dict[str, list[str]]:
    """{split: prompts}: openings of distinct lines of the plays, cut back to a word boundary.

    Training prompts come from the leading `train_frac` of the corpus (the supervised model's own
    training text), `n_eval_prompts` validation and as many test prompts from the rest.

    Draws nest: each split reads its own seeded shuffle of the lines, so a smaller draw is the
    start of a larger one (the first 64 test prompts are the same at n_eval_prompts 64 or 256, and
    at any n_prompts). A pairs stage can thus hold out more pairs than the policies sample from,
    and the policies' test prompts stay the first of the pairs' test split.
    """
    from datamodules.shakespeare import load_plays

    text = load_plays()
    cut = int(len(text) * train_frac)
    train = _openings(text[:cut], n_prompts, prompt_chars, random.Random(f"{seed}/train"))
    held = _openings(text[cut:], 2 * n_eval_prompts, prompt_chars, random.Random(f"{seed}/held-out"))
    return {"train": train, "val": held[0::2], "test": held[1::2]}


def _openings(text: str, k: int, chars: int, rng: random.Random) -> list[str]:
    # verse lines, not speaker names ("HAMLET:"), long enough to cut a prompt from; the whole list
    # is shuffled so that the first k of a draw do not depend on k
    lines = sorted({ln.strip() for ln in text.splitlines() if len(ln.strip()) > chars and not ln.endswith(":")})
    if len(lines) < k:
        raise ValueError(f"the corpus has {len(lines)} lines longer than prompt_chars={chars}, fewer than the "
                         f"{k} prompts asked for; lower n_prompts / n_eval_prompts or prompt_chars")
    rng.shuffle(lines)
    out = []
    for ln in lines[:k]:
        head = ln[: chars + 1]
        cut = head.rfind(" ")
        out.append((head[:cut] if cut > chars // 2 else head[:chars]) + " ")  # a whole-word prompt
    return out


def best_and_worst(prompts: list[str], samples: list[list[str]], scores: list[float]) -> list[dict[str, Any]]:
    """One pair per prompt: its best and its worst sample by score (`scores` flat, prompt-major).

    Ties are kept (score_chosen == score_rejected): the reader drops them with `min_margin`, and a
    tied prompt still counts as a held-out prompt to sample from.
    """
    rows, i = [], 0
    for prompt, cs in zip(prompts, samples):
        s = scores[i : i + len(cs)]
        i += len(cs)
        best, worst = max(range(len(cs)), key=s.__getitem__), min(range(len(cs)), key=s.__getitem__)
        rows.append({"prompt": prompt, "chosen": cs[best], "rejected": cs[worst],
                     "score_chosen": s[best], "score_rejected": s[worst]})
    return rows


def all_pairs(prompts: list[str], samples: list[list[str]], scores: list[float]) -> list[dict[str, Any]]:
    """Every comparison a prompt's samples make: each two samples with different scores, the higher
    chosen (K samples give up to K(K-1)/2 pairs, as InstructGPT trains its reward model on all
    comparisons of a prompt's K answers, Ouyang et al. 2022, section 3.5). A prompt whose samples all
    tie keeps one tied row, as in `best_and_worst`, so that it still counts as a prompt.
    """
    rows, i = [], 0
    for prompt, cs in zip(prompts, samples):
        s = scores[i : i + len(cs)]
        i += len(cs)
        mine = [{"prompt": prompt, "chosen": cs[a], "rejected": cs[b], "score_chosen": s[a], "score_rejected": s[b]}
                for a in range(len(cs)) for b in range(len(cs)) if s[a] > s[b]]
        rows += mine or best_and_worst([prompt], [cs], s)
    return rows


class PairCollator:
    """A batch of B pairs as 2B rows: the B chosen answers first, then the B rejected (DPO's layout)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
        prompts = [p for p, _, _ in batch] * 2
        answers = [c for _, c, _ in batch] + [r for _, _, r in batch]
        return pad_rows(prompts, answers, self.pad_id)


class PromptDataModule(BorrowedTokenizer, LightningDataModule, OptionalTestSplit):
    def __init__(
        self,
        n_prompts: int = 512,
        n_eval_prompts: int = 64,
        prompt_chars: int = 24,
        train_frac: float = 0.9,
        reward: str | None = "vader",
        max_new_tokens: int = 64,
        batch_size: int = 16,
        seed: int = 0,
        prompt_seed: int = 0,
    ):
        """Corpus prompts (batches of strings) and the reward that scores their continuations.

        Args:
            n_prompts: Training prompts.
            n_eval_prompts: Validation prompts, and as many test prompts.
            prompt_chars: A prompt is the first this many characters of a corpus line (cut back to a
                word boundary).
            train_frac: Training prompts come from this leading share of the corpus, held-out
                prompts from the rest (the mini-GPT's own split).
            reward: "vader", the dotted path of your own function from texts to scores, or null.
            max_new_tokens: Length of the continuations the modules sample for these prompts.
            batch_size: Prompts per batch.
            seed: Seed of the order in which training prompts are served.
            prompt_seed: Seed of the prompt draw: the same prompts for every training seed, and for
                the pairs stage that samples from them.
        """
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("n_prompts", n_prompts), ("n_eval_prompts", n_eval_prompts),
                            ("prompt_chars", prompt_chars), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"PromptDataModule.{name} must be >= 1, got {value}")
        if not 0.0 < train_frac < 1.0:
            raise ValueError(f"PromptDataModule.train_frac must be in (0, 1), got {train_frac}")
        self.reward = make_reward(reward)
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed
        self._prompts: dict[str, list[str]] | None = None

    @property
    def prompts(self) -> dict[str, list[str]]:
        if self._prompts is None:
            h = self.hparams
            self._prompts = corpus_prompts(h.n_prompts, h.n_eval_prompts, h.prompt_chars, h.train_frac, h.prompt_seed)
        return self._prompts

    def eval_prompts(self, split: str) -> list[str]:
        """Held-out prompts the modules sample from for `kl` and `true_reward`."""
        return self.prompts.get(split, [])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.prompts[split], batch_size=self.batch_size, shuffle=shuffle, generator=g,
                          collate_fn=list, drop_last=shuffle and len(self.prompts[split]) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @property
    def has_test_split(self) -> bool:
        return True  # the prompts' test split is always cut

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class PreferenceDataModule(BorrowedTokenizer, LightningDataModule, OptionalTestSplit):
    def __init__(
        self,
        source: str | None = None,
        reward: str | None = "vader",
        n_eval_prompts: int = 64,
        max_new_tokens: int = 64,
        min_margin: float = 0.0,
        fields: dict[str, str] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        max_length: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
        tokenizer: str | None = None,
        hf_split: str = "train",
    ):
        """Preference pairs read from a file or a dataset; the modules evaluate on their prompts.

        Args:
            source: The pairs: a .jsonl/.json/.csv/.parquet file (in a study, the pairs stage's
                ``runs:/<run id>/pairs/pairs.jsonl``), a folder of such files or a Hugging Face
                dataset name (both through `datasets`). None only parses.
            reward: The programmatic reward that scores the module's samples (`true_reward`):
                "vader", the dotted path of your own function from texts to scores, or null.
            n_eval_prompts: The distinct prompts of a held-out split the modules sample from.
            max_new_tokens: Length of the continuations the modules sample at evaluation.
            min_margin: Keep only pairs whose score gap (score_chosen - score_rejected) exceeds
                this; needs the score columns the pairs stage writes. 0 drops ties only.
            fields: Our name -> column, merged over {"prompt": "prompt", "chosen": "chosen",
                "rejected": "rejected"}.
            val_fraction: Data without a ``split`` column: share of records held out for validation.
            test_fraction: Data without a ``split`` column: share held out for test, cut from the end
                of the validation share (`datamodules.text`), so below val_fraction; 0: no test split.
            max_length: Longest prompt + answer in tokens (longer answers are cut); None: no limit.
            batch_size: Pairs per batch (a batch holds 2 * batch_size sequences).
            seed: Seed of the record shuffle and of the batch order.
            tokenizer: A Hugging Face tokenizer id or folder; None: the tokenizer of the module
                being trained (its `tokenizer` attribute).
            hf_split: Split read from a Hugging Face dataset.
        """
        super().__init__()
        self.save_hyperparameters()
        self.reward = make_reward(reward)
        for name, value in (("n_eval_prompts", n_eval_prompts), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"PreferenceDataModule.{name} must be >= 1, got {value}")
        if min_margin < 0:
            raise ValueError(f"PreferenceDataModule.min_margin must be >= 0, got {min_margin}")
        check_holdout("PreferenceDataModule", val_fraction, test_fraction)
        if source is not None and not source.startswith("runs:/"):  # the pipeline fetches runs:/ files
            path = Path(source).expanduser()
            looks_local = path.suffix in TABLE_SUFFIXES or source.startswith((".", "/", "~"))
            if looks_local and not path.exists():
                raise FileNotFoundError(f"PreferenceDataModule.source {source!r} does not exist; give a .jsonl/.json/"
                                        ".csv/.parquet file of prompt/chosen/rejected (the pairs stage writes one), "
                                        "a folder of them (read by `datasets`), or a Hugging Face dataset name")
        self.source, self.max_new_tokens, self.batch_size, self.seed = source, max_new_tokens, batch_size, seed
        self.max_length, self.tokenizer_name = max_length, tokenizer
        self.fields = {**FIELDS, **(fields or {})}
        self.records: dict[str, list[dict[str, Any]]] | None = None  # split -> prompt/chosen/rejected records
        self._eval_prompts: dict[str, list[str]] = {}

    # ----------------------------------------------------------------- reading

    def _read_rows(self) -> list[dict[str, Any]]:
        if self.source is None:
            raise ValueError("PreferenceDataModule has no source: set data.init_args.source to a pairs file (the "
                             "pairs stage writes runs:/<run id>/pairs/pairs.jsonl) or a preference dataset")
        if self.source.startswith("runs:/"):
            raise ValueError(f"PreferenceDataModule.source {self.source!r} names an MLflow run's file: `practicum run` "
                             "(or a study) fetches it; outside the pipeline give the local file")
        path = Path(self.source).expanduser()
        if path.is_file():
            return read_table(path, "PreferenceDataModule")
        return list(load_hf_dataset(self.source, self.hparams.hf_split, "PreferenceDataModule"))

    def _ensure_records(self) -> None:
        if self.records is not None:
            return
        rows = self._read_rows()
        missing = [c for c in self.fields.values() if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"PreferenceDataModule.source {self.source!r} lacks column(s) {missing} (has "
                             f"{sorted(rows[0]) if rows else []}); map ours to yours with fields={{'prompt': ...}}")
        scored = bool(rows) and {"score_chosen", "score_rejected"} <= set(rows[0])
        if self.hparams.min_margin > 0 and not scored:
            raise ValueError(f"PreferenceDataModule.min_margin={self.hparams.min_margin} needs score_chosen and "
                             "score_rejected columns (the pairs stage writes them); set min_margin: 0")
        keep = ("score_chosen", "score_rejected") if scored else ()
        records = [{**{ours: str(r[theirs]) for ours, theirs in self.fields.items()}, **{k: r[k] for k in keep},
                    "split": r.get("split")} for r in rows]
        if records and records[0]["split"] in SPLITS:  # the pairs stage's own split
            split = {s: [r for r in records if r["split"] == s] for s in SPLITS}
        else:
            random.Random(self.seed).shuffle(records)
            split = dict(zip(SPLITS, split_holdout(records, self.hparams.val_fraction, self.hparams.test_fraction)))
        n = self.hparams.n_eval_prompts
        self._eval_prompts = {s: list(dict.fromkeys(r["prompt"] for r in rs))[:n] for s, rs in split.items()}
        if scored:  # ties carry no preference; a wider gap is a surer one
            gap = self.hparams.min_margin
            split = {s: [r for r in rs if r["score_chosen"] - r["score_rejected"] > gap] for s, rs in split.items()}
        self.records = split
        for s in ("train", "val"):
            if not self.records[s]:
                raise ValueError(f"PreferenceDataModule: the {s} split has no pairs (every pair tied or below "
                                 "min_margin, or too few records); lower min_margin or give more data")

    def eval_prompts(self, split: str) -> list[str]:
        """Held-out prompts the module samples from for `kl` and `true_reward` (distinct prompts of the split)."""
        self._ensure_records()
        return self._eval_prompts.get(split, [])

    # ----------------------------------------------------------------- loaders

    def _tokenised(self, split: str) -> list[tuple[list[int], list[int], list[int]]]:
        self._ensure_records()
        bos, _, _ = special_ids(self.tokenizer)
        out = []
        for r in self.records[split]:
            p = ([bos] if bos is not None else []) + encode(self.tokenizer, r["prompt"])
            c, rej = encode(self.tokenizer, r["chosen"]), encode(self.tokenizer, r["rejected"])
            if self.max_length is not None:
                room = self.max_length - len(p)
                if room < 1:
                    continue  # a prompt that leaves no room for an answer carries no preference
                c, rej = c[:room], rej[:room]
            if c and rej:
                out.append((p, c, rej))
        return out

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        _, _, pad = special_ids(self.tokenizer)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._tokenised(split), batch_size=self.batch_size, shuffle=shuffle, generator=g,
                          collate_fn=PairCollator(pad), drop_last=shuffle and len(self.records[split]) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @property
    def has_test_split(self) -> bool:
        self._ensure_records()
        return bool(self.records["test"])

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise ValueError("this PreferenceDataModule has no test split: set test_fraction > 0 (below val_fraction)")
        return self._loader("test", shuffle=False)
