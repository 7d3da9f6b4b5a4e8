"""What the text datamodules share: the label convention, padding, the tokenizer they borrow, file
readers and the held-out split.

Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` (not shifted)
and `IGNORE_INDEX` marks positions that carry no loss (prompt and padding); the model side shifts
by one. This is the bottom layer, so the modules that read such labels import the constant from
here.

One meaning of ``test_fraction`` for every text datamodule (as in `ShakespeareDataModule`): the
share of all records held out as a test split that nothing selects on, cut from the end of the
validation share, so it must be below ``val_fraction``, and the training data are the same with
or without a test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def pad_examples(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) rows to the longest: input_ids with `pad_id`, labels with -100."""
    t = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows whose labels are the completion's alone."""
    return pad_examples([(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions)], pad_id)


class PadCollator:
    """A batch of (input_ids, labels) examples, right-padded (`pad_examples`)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return pad_examples(batch, self.pad_id)


def read_table(path: Path, owner: str) -> list[dict[str, Any]]:
    """The records of a .jsonl / .json / .csv / .parquet file (through pandas)."""
    import pandas as pd

    readers = {".jsonl": lambda p: pd.read_json(p, lines=True), ".json": pd.read_json, ".csv": pd.read_csv,
               ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise ValueError(f"{owner}.source {path}: unknown file type {path.suffix!r}; give one of {TABLE_SUFFIXES}")
    return readers[path.suffix](path).to_dict(orient="records")


def load_hf_dataset(name: str, split: str, owner: str):
    """`datasets.load_dataset(name, split=split)`: a hub name (needs the network) or a local folder of files."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{owner}.source {name!r} is neither a file nor a corpus this project embeds, so it is read "
                          "as a Hugging Face dataset name, which needs `pip install datasets` (and the network)") from None
    return datasets.load_dataset(name, split=split)


def check_holdout(owner: str, val_fraction: float, test_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{owner}.val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < val_fraction:
        raise ValueError(f"{owner}.test_fraction must be in [0, val_fraction={val_fraction}): the test share is cut "
                         f"from the validation share, which must keep some data; got {test_fraction}")


def split_holdout(records: list, val_fraction: float, test_fraction: float) -> tuple[list, list, list]:
    """(train, val, test) of already shuffled records: the last round(n * val_fraction) are held out
    (at least one), and the last round(n * test_fraction) of those (at least one if asked) are the test."""
    n = len(records)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    return records[: n - n_val], records[n - n_val : n - n_test], records[n - n_test :] if n_test else []


class BorrowedTokenizer:
    """The `tokenizer` of a datamodule: a Hugging Face one named by `tokenizer_name`, one given with
    `set_tokenizer`, or else the one of the LightningModule being trained (its `tokenizer`)."""

    tokenizer_name: str | None = None
    _tokenizer: Any = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer object (Hugging Face or the mini-GPT's) instead of resolving one."""
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
            else:
                trainer = getattr(self, "trainer", None)
                self._tokenizer = getattr(trainer.lightning_module if trainer is not None else None, "tokenizer", None)
            if self._tokenizer is None:
                raise ValueError(f"{type(self).__name__} has no tokenizer: pass tokenizer='<HF id or folder>', call "
                                 "set_tokenizer(tok), or train a LightningModule that has a `tokenizer` attribute")
        return self._tokenizer
