"""Preference pairs (prompt, chosen, rejected) for DPO: sampled and labelled offline, or read from a file.

``source="sampled"`` builds the data the way the DPO paper's controlled-sentiment task does
(Rafailov et al. 2023, section 6.1): prompts are the openings of lines of a corpus (here the
Shakespeare plays, which the supervised mini-GPT learned), the supervised model samples
`samples_per_prompt` continuations of each, a programmatic reward scores them, and the best and the
worst continuation of a prompt become its (chosen, rejected) pair; prompts whose samples all score
the same give no pair. The reward is VADER's sentiment (Hutto & Gilbert 2014): the `compound`
score in [-1, 1] of a rule-based lexicon of ~7,500 human-rated words shipped inside the
`vaderSentiment` wheel, so anyone can read why a text scored what it did
(``SentimentIntensityAnalyzer().polarity_scores(text)``). Continuations are drawn from the model
being trained through its ``sample_completions(prompts, n, max_new_tokens, temperature, seed,
reference=True)`` (DPOModule has it), once, before the first step: the pairs are written to a
JSON-lines file in the cache (keyed by the model file and the settings) and reused after.

Any other source is a preference dataset with ``prompt``, ``chosen`` and ``rejected`` columns (names
mappable with `fields`): a .jsonl / .json / .csv / .parquet file, or what ``datasets.load_dataset``
reads: a Hugging Face dataset name (needs the network) or a local folder of data files. Such data has no programmatic reward, so the
module's `true_reward` is not logged for it; `kl` still is, on its held-out prompts.

Splits: sampled prompts for training come from the leading `train_frac` of the corpus (the
supervised model's own training text), validation and test prompts from the rest, halves apart;
file data is split by record after a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from contract import OptionalTestSplit
from datamodules.tokenizers import encode, special_ids

IGNORE_INDEX = -100
SAMPLED = "sampled"
REWARDS = ("vader",)
FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


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
        raise ValueError(f"PreferenceDataModule.reward must be one of {REWARDS}, the dotted path of a function "
                         f"list[str] -> list[float] (e.g. mypkg.rewards.length), or null; got {name!r}")
    return fn


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows with Hugging Face labels: -100 on prompt and padding."""
    t = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(completions), t), pad, dtype=torch.long)
    labels = torch.full((len(completions), t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(completions), t), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = torch.tensor(p + c, dtype=torch.long)
        input_ids[i, : len(row)] = row
        labels[i, len(p) : len(row)] = row[len(p) :]
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """A batch of B pairs as 2B rows: the B chosen answers first, then the B rejected (DPO's layout)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
        prompts = [p for p, _, _ in batch] * 2
        answers = [c for _, c, _ in batch] + [r for _, _, r in batch]
        return pad_rows(prompts, answers, self.pad_id)


class PreferenceDataModule(LightningDataModule, OptionalTestSplit):
    def __init__(
        self,
        source: str = SAMPLED,
        reward: str | None = "vader",
        n_prompts: int = 512,
        n_eval_prompts: int = 64,
        prompt_chars: int = 24,
        samples_per_prompt: int = 4,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        min_margin: float = 0.0,
        train_frac: float = 0.9,
        fields: dict[str, str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_length: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
        tokenizer: str | None = None,
        hf_split: str = "train",
        cache_dir: str | None = None,
    ):
        """Preference pairs for DPO, sampled from the supervised model and labelled, or from a file.

        Args:
            source: "sampled" (see the module docstring), a .jsonl/.json/.csv/.parquet file of
                prompt/chosen/rejected records, or a Hugging Face dataset name (needs the network).
            reward: The programmatic reward that labels sampled pairs and scores the module's
                samples: "vader" (sentiment, higher is more positive), the dotted path of your own
                function from texts to scores, or null for file data.
            n_prompts: Sampled: training prompts (pairs are at most this many; ties give none).
            n_eval_prompts: Sampled: validation prompts and as many test prompts.
            prompt_chars: Sampled: a prompt is the first this many characters of a corpus line
                (cut back to a word boundary).
            samples_per_prompt: Sampled: continuations drawn per prompt (>= 2); the best and the
                worst by reward make the pair.
            max_new_tokens: Length of sampled continuations (here and in the module's evaluation).
            temperature: Sampled: temperature of the continuations of the pairs.
            min_margin: Sampled: keep only pairs whose reward gap exceeds this (0: every pair
                but ties). Applied when the pairs are read, so the cached samples serve any value.
            train_frac: Sampled: training prompts come from this leading share of the corpus, the
                held-out prompts from the rest (the mini-GPT's own split).
            fields: File data: our name -> column, merged over {"prompt": "prompt", "chosen":
                "chosen", "rejected": "rejected"}.
            val_fraction: File data: share of records held out for validation.
            test_fraction: File data: share held out for test (0: no test split).
            max_length: Longest prompt + answer in tokens (longer answers are cut); None: no limit.
            batch_size: Pairs per batch (a batch holds 2 * batch_size sequences).
            seed: Seed of the prompt draw, of the samples and of the record shuffle.
            tokenizer: A Hugging Face tokenizer id or folder; None: the tokenizer of the module
                being trained (its `tokenizer` attribute).
            hf_split: Split read from a Hugging Face dataset.
            cache_dir: Where sampled pairs are kept; default $PRACTICUM_CACHE or ~/.cache/practicum.
        """
        super().__init__()
        self.save_hyperparameters()
        self.reward = make_reward(reward)
        if source == SAMPLED and self.reward is None:
            raise ValueError("PreferenceDataModule: source='sampled' needs a reward to label the pairs: reward='vader'")
        if samples_per_prompt < 2:
            raise ValueError(f"PreferenceDataModule.samples_per_prompt must be >= 2 (a pair), got {samples_per_prompt}")
        for name, value in (("n_prompts", n_prompts), ("n_eval_prompts", n_eval_prompts),
                            ("prompt_chars", prompt_chars), ("max_new_tokens", max_new_tokens),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"PreferenceDataModule.{name} must be >= 1, got {value}")
        if min_margin < 0:
            raise ValueError(f"PreferenceDataModule.min_margin must be >= 0, got {min_margin}")
        if not 0.0 < train_frac < 1.0:
            raise ValueError(f"PreferenceDataModule.train_frac must be in (0, 1), got {train_frac}")
        if not (0.0 < val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
            raise ValueError("PreferenceDataModule: need 0 < val_fraction, 0 <= test_fraction and "
                             f"val_fraction + test_fraction < 1; got {val_fraction}, {test_fraction}")
        if source != SAMPLED:
            path = Path(source).expanduser()
            looks_local = path.suffix in (".jsonl", ".json", ".csv", ".parquet") or source.startswith((".", "/", "~"))
            if looks_local and not path.exists():
                raise FileNotFoundError(f"PreferenceDataModule.source {source!r} does not exist; give 'sampled', a "
                                        ".jsonl/.json/.csv/.parquet file of prompt/chosen/rejected, a folder of them "
                                        "(read by `datasets`), or a Hugging Face dataset name")
        self.source, self.max_new_tokens, self.batch_size, self.seed = source, max_new_tokens, batch_size, seed
        self.max_length = max_length
        self.fields = {**FIELDS, **(fields or {})}
        self.cache_dir = Path(cache_dir or os.environ.get("PRACTICUM_CACHE", Path.home() / ".cache" / "practicum"))
        self._tokenizer: Any = None
        self.records: dict[str, list[dict[str, Any]]] | None = None  # split -> prompt/chosen/rejected records
        self._prompts: dict[str, list[str]] = {}
        self.pairs_file: Path | None = None

    # ----------------------------------------------------------------- tokenizer and model

    @property
    def _module(self):
        return self.trainer.lightning_module if self.trainer is not None else None

    def set_tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.hparams.tokenizer is not None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)
            else:
                self._tokenizer = getattr(self._module, "tokenizer", None)
            if self._tokenizer is None:
                raise ValueError("PreferenceDataModule has no tokenizer: pass tokenizer='<HF id or folder>', call "
                                 "set_tokenizer(tok), or train a LightningModule that has a `tokenizer` attribute")
        return self._tokenizer

    # ----------------------------------------------------------------- prompts and pairs

    def corpus_prompts(self) -> dict[str, list[str]]:
        """Sampled source: {split: prompts}, openings of distinct corpus lines, drawn with `seed`."""
        if self._prompts:
            return self._prompts
        from datamodules.shakespeare import load_plays

        text = load_plays()
        cut = int(len(text) * self.hparams.train_frac)
        rng = random.Random(self.seed)
        n, n_eval = self.hparams.n_prompts, self.hparams.n_eval_prompts
        train = self._openings(text[:cut], n, rng)
        held = self._openings(text[cut:], 2 * n_eval, rng)
        self._prompts = {"train": train, "val": held[:n_eval], "test": held[n_eval:]}
        return self._prompts

    def _openings(self, text: str, k: int, rng: random.Random) -> list[str]:
        chars = self.hparams.prompt_chars
        # verse lines, not speaker names ("HAMLET:"), long enough to cut a prompt from
        lines = sorted({ln.strip() for ln in text.splitlines() if len(ln.strip()) > chars and not ln.endswith(":")})
        if len(lines) < k:
            raise ValueError(f"the corpus has {len(lines)} lines longer than prompt_chars={chars}, fewer than the "
                             f"{k} prompts asked for; lower n_prompts / n_eval_prompts or prompt_chars")
        out = []
        for ln in rng.sample(lines, k):
            head = ln[: chars + 1]
            cut = head.rfind(" ")
            out.append((head[:cut] if cut > chars // 2 else head[:chars]) + " ")  # a whole-word prompt
        return out

    def eval_prompts(self, split: str) -> list[str]:
        """Held-out prompts the module samples from for `kl` and `true_reward` (distinct prompts of the split)."""
        self._ensure_records()
        if self.source == SAMPLED:
            return self.corpus_prompts().get(split, [])
        return list(dict.fromkeys(r["prompt"] for r in self.records.get(split, [])))[: self.hparams.n_eval_prompts]

    def _cache_key(self, module) -> str:
        source = getattr(module, "source", None) or getattr(module.hparams, "backbone", "")
        h = hashlib.sha256()
        path = Path(str(source))
        if path.is_file():  # the model's own bytes: a retrained base at the same path gets new pairs
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(source).encode())
        settings = {k: self.hparams[k] for k in ("reward", "n_prompts", "n_eval_prompts", "prompt_chars",
                                                 "samples_per_prompt", "max_new_tokens", "temperature",
                                                 "train_frac", "seed")}
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()[:20]

    def build_pairs(self, module) -> dict[str, list[dict[str, Any]]]:
        """Sample continuations from `module` (its reference policy), score them, keep best vs worst."""
        k = self.hparams.samples_per_prompt
        records: dict[str, list[dict[str, Any]]] = {}
        for i, (split, prompts) in enumerate(self.corpus_prompts().items()):
            samples = module.sample_completions(prompts, k, self.max_new_tokens, self.hparams.temperature,
                                                seed=self.seed * 1000 + i, reference=True)
            scores = self.reward([c for cs in samples for c in cs])
            rows = []
            for j, (prompt, cs) in enumerate(zip(prompts, samples)):
                s = scores[j * k : (j + 1) * k]
                best, worst = max(range(k), key=s.__getitem__), min(range(k), key=s.__getitem__)
                if s[best] > s[worst]:
                    rows.append({"prompt": prompt, "chosen": cs[best], "rejected": cs[worst],
                                 "score_chosen": s[best], "score_rejected": s[worst]})
            records[split] = rows
        return records

    def _read_file_records(self) -> list[dict[str, Any]]:
        path = Path(self.source).expanduser()
        if path.is_file():
            import pandas as pd

            readers = {".jsonl": lambda p: pd.read_json(p, lines=True), ".json": pd.read_json, ".csv": pd.read_csv,
                       ".parquet": pd.read_parquet}
            if path.suffix not in readers:
                raise ValueError(f"PreferenceDataModule.source {path}: unknown file type {path.suffix!r}")
            rows = readers[path.suffix](path).to_dict(orient="records")
        else:
            try:
                import datasets
            except ImportError:
                raise ImportError(f"PreferenceDataModule.source {self.source!r} is read as a Hugging Face dataset "
                                  "name, which needs `pip install datasets` (and the network)") from None
            rows = list(datasets.load_dataset(self.source, split=self.hparams.hf_split))
        missing = [c for c in self.fields.values() if rows and c not in rows[0]]
        if missing:
            raise ValueError(f"PreferenceDataModule.source {self.source!r} lacks column(s) {missing} (has "
                             f"{sorted(rows[0]) if rows else []}); map ours to yours with fields={{'prompt': ...}}")
        return [{ours: str(r[theirs]) for ours, theirs in self.fields.items()} for r in rows]

    def _ensure_records(self) -> None:
        if self.records is not None:
            return
        if self.source == SAMPLED:
            module = self._module
            if module is None or not hasattr(module, "sample_completions"):
                raise ValueError("PreferenceDataModule(source='sampled') samples from the model being trained: use it "
                                 "with a module that has sample_completions (modules.align.module.DPOModule)")
            self.pairs_file = self.cache_dir / "preference" / f"{self._cache_key(module)}.jsonl"
            if self.pairs_file.is_file():
                rows = [json.loads(ln) for ln in self.pairs_file.read_text().splitlines() if ln]
                self.records = {s: [{k: v for k, v in r.items() if k != "split"} for r in rows if r["split"] == s]
                                for s in ("train", "val", "test")}
            else:
                self.records = self.build_pairs(module)
                self.pairs_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.pairs_file.with_suffix(f".{os.getpid()}.part")
                tmp.write_text("".join(json.dumps({"split": s, **r}) + "\n" for s, rs in self.records.items() for r in rs))
                tmp.replace(self.pairs_file)
            gap = self.hparams.min_margin
            self.records = {s: [r for r in rs if r["score_chosen"] - r["score_rejected"] > gap]
                            for s, rs in self.records.items()}
        else:
            rows = self._read_file_records()
            random.Random(self.seed).shuffle(rows)
            n_val = max(1, int(len(rows) * self.hparams.val_fraction))
            n_test = int(len(rows) * self.hparams.test_fraction)
            self.records = {"val": rows[:n_val], "test": rows[n_val : n_val + n_test], "train": rows[n_val + n_test :]}
        for split in ("train", "val"):
            if not self.records.get(split):
                raise ValueError(f"PreferenceDataModule: the {split} split has no pairs (every sampled prompt tied, or "
                                 "too few records); raise n_prompts / samples_per_prompt or give more data")

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
        return self.source == SAMPLED or self.hparams.test_fraction > 0

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise ValueError("this PreferenceDataModule has no test split: set test_fraction > 0")
        return self._loader("test", shuffle=False)
