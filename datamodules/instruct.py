"""Instruction / question-answer data and plain-text corpora for causal-LM fine-tuning.

Two modes share one tokenisation path:

- ``mode="instruct"``: each record becomes ``prompt + response``; the prompt comes from a
  template filled with the record's fields and its tokens get label -100, so the loss is
  the response's alone (the usual supervised fine-tuning objective).
- ``mode="text"``: documents are concatenated (EOS between them when the tokenizer has one)
  and cut into ``max_length`` blocks; every token is a target (domain-adaptive pretraining).

Sources: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a ``.txt`` / ``.md`` file or a
folder of them (text mode), a Hugging Face dataset name (``datasets.load_dataset``, needs the
network and the ``datasets`` package), or the embedded ``"python-docs"`` corpus.

``"python-docs"`` is the Python language reference as it ships inside CPython itself
(``pydoc_data.topics``: 79 topics, ~465k characters of English technical prose about
statements, operators and the data model). It is present wherever Python is, needs no
download, is real human-written text, and is a domain far from the Shakespeare the
mini-GPT is pretrained on (modern technical register, code fragments, grammar rules), so
fine-tuning on it measures real adaptation rather than more of the same distribution.

Labels follow the Hugging Face convention (`datamodules.text`): ``labels`` is aligned with
``input_ids`` (not shifted) and -100 marks positions that carry no loss; the model side shifts by one.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from contract import Fingerprinted, OptionalTestSplit
from datamodules.text import (
    IGNORE_INDEX,
    TABLE_SUFFIXES,
    BorrowedTokenizer,
    PadCollator,
    check_holdout,
    load_hf_dataset,
    read_table,
    split_holdout,
)
from datamodules.tokenizers import encode, special_ids

PYTHON_DOCS = "python-docs"
TEXT_SUFFIXES = (".txt", ".md", ".rst")

# Stanford Alpaca's two prompts (with and without an "input" field), the de-facto default
# for instruction tuning; "{...}" names are keys of `fields`.
ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "response": "output"}


def python_docs() -> list[str]:
    """The embedded corpus: CPython's own language-reference topics, in a stable order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


class TokenDataset(Dataset):
    """Examples already tokenised: lists of (input_ids, labels)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.examples[i]


def pack(examples: list[tuple[list[int], list[int]]], length: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples and cut into blocks of `length`; the last block may be shorter (the
    collator pads it). Labels travel with their tokens, so prompt masking survives packing."""
    ids = [t for e in examples for t in e[0]]
    lab = [t for e in examples for t in e[1]]
    return [(ids[i : i + length], lab[i : i + length]) for i in range(0, len(ids), length)]


class InstructDataModule(BorrowedTokenizer, LightningDataModule, Fingerprinted, OptionalTestSplit):
    def __init__(
        self,
        source: str = PYTHON_DOCS,
        mode: str = "instruct",
        fields: dict[str, str] | None = None,
        template: str = "alpaca",
        text_field: str = "text",
        max_length: int = 512,
        packing: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        max_records: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: str | None = None,
        hf_split: str = "train",
    ):
        """Instruction or plain-text data, tokenised for a causal LM.

        Args:
            source: A .jsonl/.json/.csv/.parquet file, a .txt/.md/.rst file or a folder of them
                (text mode), "python-docs" (embedded corpus, see the module docstring), or a
                Hugging Face dataset name (needs the network and `pip install datasets`).
            mode: "instruct" (prompt + response, loss on the response) or "text" (every token).
            fields: Template name -> record column, merged over {"instruction": "instruction",
                "input": "input", "response": "output"}; "response" names the target column.
                E.g. {"instruction": "question", "response": "answer"}.
            template: "alpaca" (Alpaca's prompt, its no-input variant when "input" is empty or
                absent) or a format string over the names in `fields`, e.g.
                "Question: {instruction}\\nAnswer: ".
            text_field: Column holding the document in text mode for tabular sources.
            max_length: Tokens per example (instruct: longer ones are truncated; text and
                packing: the block length).
            packing: Instruct mode: concatenate examples into full `max_length` blocks
                instead of padding each one (text mode always packs).
            val_fraction: Share held out for validation (records in instruct mode, the tail of
                the shuffled token stream in text mode).
            test_fraction: Share held out as a test split that nothing selects on (0: none, and
                the pipeline does not test), cut from the end of the validation share (records in
                instruct mode, the tail of the token stream in text mode): below val_fraction, and
                training data are the same as without it (`datamodules.text`).
            max_records: Use at most this many records / documents (after the seeded shuffle).
            batch_size: Examples per batch.
            num_workers: DataLoader workers.
            seed: Seed of the record shuffle (the split depends on it).
            tokenizer: A Hugging Face tokenizer id or folder. None: the tokenizer of the
                LightningModule being trained (its `tokenizer` attribute), or one given
                through `set_tokenizer`.
            hf_split: Split to read from a Hugging Face dataset.
        """
        super().__init__()
        self.save_hyperparameters()
        if mode not in ("instruct", "text"):
            raise ValueError(f"InstructDataModule.mode must be 'instruct' or 'text', got {mode!r}")
        if max_length < 2:
            raise ValueError(f"InstructDataModule.max_length must be >= 2 (one input, one target), got {max_length}")
        check_holdout("InstructDataModule", val_fraction, test_fraction)
        if batch_size < 1:
            raise ValueError(f"InstructDataModule.batch_size must be >= 1, got {batch_size}")
        if max_records is not None and max_records < 2:
            raise ValueError(f"InstructDataModule.max_records must be >= 2 or None, got {max_records}")
        self.fields = {**DEFAULT_FIELDS, **(fields or {})}
        if mode == "instruct" and template != "alpaca":
            try:
                template.format(**{k: "" for k in self.fields})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"InstructDataModule.template {template!r} uses a name that is not a key of "
                    f"fields {sorted(self.fields)} ({e!r}); add it to `fields` or fix the template"
                ) from None
        self.source = source
        self.mode = mode
        self.template = template
        self.text_field = text_field
        self.max_length = max_length
        self.packing = packing
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_records = max_records
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer_name = tokenizer
        self.hf_split = hf_split
        self.dropped = 0  # instruct examples whose prompt left no room for a target
        self.train_set: TokenDataset | None = None
        self.val_set: TokenDataset | None = None
        self.test_set: TokenDataset | None = None
        self._check_source()  # local paths only: a dataset or tokenizer on the hub is fetched in prepare_data

    # ----------------------------------------------------------------- source reading

    def _check_source(self) -> None:
        if self.source == PYTHON_DOCS:
            return
        path = Path(self.source)
        looks_local = path.suffix in TABLE_SUFFIXES + TEXT_SUFFIXES or self.source.startswith((".", "/", "~"))
        if looks_local and not path.expanduser().exists():
            raise FileNotFoundError(
                f"InstructDataModule.source {self.source!r} does not exist; give a .jsonl/.json/.csv/"
                f".parquet/.txt file, a folder of text files, {PYTHON_DOCS!r}, or a Hugging Face dataset name"
            )
        if path.is_file() and path.suffix in TEXT_SUFFIXES and self.mode != "text":
            raise ValueError(
                f"InstructDataModule.source {self.source!r} is plain text, which has no instruction/response "
                "fields: set mode='text' (domain adaptation) or give a .jsonl/.csv/.parquet file"
            )

    def read_records(self) -> list[dict[str, Any]] | list[str]:
        """Records (dicts) of a tabular / HF source, or documents (strings) of a text source."""
        if self.source == PYTHON_DOCS:
            if self.mode != "text":
                raise ValueError(f"source {PYTHON_DOCS!r} is a plain-text corpus: set mode='text'")
            return python_docs()
        path = Path(self.source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"InstructDataModule.source folder {path} holds no {TEXT_SUFFIXES} files")
            return [p.read_text(encoding="utf-8", errors="replace") for p in files]
        if path.is_file():
            if path.suffix in TEXT_SUFFIXES:
                return [path.read_text(encoding="utf-8", errors="replace")]
            return read_table(path, "InstructDataModule")
        return list(self._hf_dataset())

    def _is_hf_dataset(self) -> bool:
        return self.source != PYTHON_DOCS and not Path(self.source).expanduser().exists()

    def _hf_dataset(self):
        return load_hf_dataset(self.source, self.hf_split, "InstructDataModule")

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node while the others wait: hub downloads land
        # in the Hugging Face caches once, and every rank's setup then reads them locally
        if self._is_hf_dataset():
            self._hf_dataset()
        if self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.tokenizer_name)

    # ----------------------------------------------------------------- tokenisation

    def _prompt(self, record: dict[str, Any]) -> str:
        values = {}
        for name, column in self.fields.items():
            if name == "response":
                continue
            v = record.get(column)
            values[name] = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
        if self.template == "alpaca":
            return (ALPACA if values.get("input", "").strip() else ALPACA_NO_INPUT).format(**values)
        return self.template.format(**values)

    def _instruct_examples(self, records: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
        tok = self.tokenizer
        bos, eos, _ = special_ids(tok)
        response_col = self.fields["response"]
        needed = {response_col} | {self.fields["instruction"]}
        if self.template != "alpaca":
            needed |= {c for n, c in self.fields.items() if "{" + n + "}" in self.template}
        missing = needed - set(records[0])
        if missing:
            raise ValueError(
                f"InstructDataModule: records of {self.source!r} lack column(s) {sorted(missing)}; they have "
                f"{sorted(records[0])}. Map them with fields={{'instruction': ..., 'response': ...}}"
            )
        examples = []
        for rec in records:
            prompt = ([bos] if bos is not None else []) + encode(tok, self._prompt(rec))
            response = encode(tok, str(rec[response_col])) + ([eos] if eos is not None else [])
            ids = (prompt + response)[: self.max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + response)[: self.max_length]
            # a prompt that fills max_length leaves no target: the example teaches nothing
            if all(t == IGNORE_INDEX for t in labels[1:]):
                self.dropped += 1
                continue
            examples.append((ids, labels))
        if not examples:
            raise ValueError(
                f"InstructDataModule: every prompt of {self.source!r} is at least max_length={self.max_length} "
                "tokens long, so no response token is left to learn; raise max_length"
            )
        return examples

    def _text_stream(self, docs: list[str]) -> list[int]:
        tok = self.tokenizer
        _, eos, _ = special_ids(tok)
        stream: list[int] = []
        for d in docs:
            stream += encode(tok, d) + ([eos] if eos is not None else [])
        return stream

    def _blocks(self, stream: list[int]) -> list[tuple[list[int], list[int]]]:
        n = self.max_length
        blocks = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]
        return [(b, list(b)) for b in blocks]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records = self.read_records()
        if len(records) == 0:
            raise ValueError(f"InstructDataModule.source {self.source!r} has no records")
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        records = [records[i] for i in order][: self.max_records]
        if self.mode == "text":
            docs = [r if isinstance(r, str) else str(r.get(self.text_field, "")) for r in records]
            if not isinstance(records[0], str) and self.text_field not in records[0]:
                raise ValueError(
                    f"InstructDataModule.text_field {self.text_field!r} is not a column of {self.source!r} "
                    f"(columns: {sorted(records[0])}); set text_field"
                )
            stream = self._text_stream(docs)
            cut = int(len(stream) * (1 - self.val_fraction))
            cut_test = len(stream) - int(len(stream) * self.test_fraction)
            train, val = self._blocks(stream[:cut]), self._blocks(stream[cut:cut_test])
            test = self._blocks(stream[cut_test:])
        else:
            if isinstance(records[0], str):
                raise ValueError(f"InstructDataModule.source {self.source!r} is plain text: set mode='text'")
            train, val, test = (self._instruct_examples(part) if part else []
                                for part in split_holdout(records, self.val_fraction, self.test_fraction))
            if self.packing:
                train, val, test = (pack(d, self.max_length) for d in (train, val, test))
        if not train or not val or (self.test_fraction > 0 and not test):
            raise ValueError(
                f"InstructDataModule: {self.source!r} gives {len(train)} train, {len(val)} val and {len(test)} test "
                f"examples of max_length={self.max_length}; use more data, a smaller max_length or other "
                "val_fraction / test_fraction"
            )
        self.train_set, self.val_set = TokenDataset(train), TokenDataset(val)
        self.test_set = TokenDataset(test) if self.test_fraction > 0 else None

    # ----------------------------------------------------------------- loaders

    def _loader(self, data: TokenDataset, shuffle: bool) -> DataLoader:
        _, _, pad = special_ids(self.tokenizer)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=g if shuffle else None,
            collate_fn=PadCollator(pad),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @property
    def has_test_split(self) -> bool:
        """The pipeline tests only datamodules that have one (test_fraction > 0)."""
        return self.test_fraction > 0

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            raise ValueError("this InstructDataModule has no test split: set test_fraction > 0 (below val_fraction)")
        return self._loader(self.test_set, shuffle=False)

    def fingerprint(self) -> str:
        """sha256 of the token ids and labels actually used (train, val, then test if any), after
        setup; without a test split it is the hash runs logged before test splits existed."""
        if self.train_set is None:
            raise RuntimeError("InstructDataModule.fingerprint() needs setup() first")
        h = hashlib.sha256()
        for data in (self.train_set, self.val_set, *([self.test_set] if self.test_set is not None else [])):
            for ids, labels in data.examples:
                h.update(np.asarray(ids, dtype=np.int64).tobytes())
                h.update(np.asarray(labels, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()
