"""Sequence-to-sequence tasks whose alignments are known, generated from a seed: no download.

- reverse: the target is the source backwards; target token i comes from source position L - 1 - i
  (an anti-diagonal alignment, fixed by position);
- sort: the target is the source in ascending order; target token i comes from wherever that
  symbol sits in the source (an alignment by content).

Tokens are the symbols 0 .. n_symbols - 1, then three specials (`Vocab`): BOS (also the separator of
the decoder-only layout), EOS and PAD. Training and validation draw lengths uniformly from
`train_lengths`; the test split holds `n_test_per_length` strings of every length in `test_lengths`,
so the module can score exact match by length, inside and beyond the training lengths.

A batch is a dict of src (B, S) and tgt (B, S), right-padded with PAD to the longest in the batch,
and their lengths src_len, tgt_len (B,) (equal for both tasks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from contract import Fingerprinted

TASKS = ("reverse", "sort")


@dataclass(frozen=True)
class Vocab:
    """Token ids: symbols 0 .. n_symbols - 1, then BOS, EOS, PAD."""

    n_symbols: int

    @property
    def bos(self) -> int:
        return self.n_symbols

    @property
    def eos(self) -> int:
        return self.n_symbols + 1

    @property
    def pad(self) -> int:
        return self.n_symbols + 2

    @property
    def size(self) -> int:
        return self.n_symbols + 3


def make_target(task: str, src: torch.Tensor) -> torch.Tensor:
    """The target of one unpadded source string (L,)."""
    if task == "reverse":
        return src.flip(0)
    if task == "sort":
        return src.sort().values
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class TaskSet(Dataset):
    """Strings of the given lengths, each drawn uniformly from the symbols, with their targets."""

    def __init__(self, task: str, lengths: torch.Tensor, n_symbols: int, generator: torch.Generator):
        self.src = [torch.randint(n_symbols, (int(n),), generator=generator) for n in lengths]
        self.tgt = [make_target(task, s) for s in self.src]

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.src[i], self.tgt[i]


def collate(items: list[tuple[torch.Tensor, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (src, tgt) to the batch's longest: src, tgt (B, S), src_len, tgt_len (B,)."""
    src = torch.nn.utils.rnn.pad_sequence([s for s, _ in items], batch_first=True, padding_value=pad)
    tgt = torch.nn.utils.rnn.pad_sequence([t for _, t in items], batch_first=True, padding_value=pad)
    return dict(src=src, tgt=tgt, src_len=torch.tensor([len(s) for s, _ in items]),
                tgt_len=torch.tensor([len(t) for _, t in items]))


class Seq2SeqTaskDataModule(L.LightningDataModule, Fingerprinted):
    def __init__(
        self,
        task: str = "reverse",
        n_symbols: int = 10,
        train_lengths: tuple[int, int] = (1, 16),
        test_lengths: tuple[int, int] = (8, 32),
        n_train: int = 20000,
        n_val: int = 512,
        n_test_per_length: int = 64,
        batch_size: int = 64,
        seed: int = 0,
    ):
        """Generated reversal or sorting of random symbol strings.

        Args:
            task: "reverse" (positional, anti-diagonal alignment) or "sort" (alignment by content).
            n_symbols: Alphabet size; the vocabulary adds BOS, EOS and PAD (`Vocab`).
            train_lengths: Inclusive (min, max) length of training and validation strings.
            test_lengths: Inclusive (min, max) length of test strings, n_test_per_length of each.
            n_train, n_val: Strings in the training and validation splits.
            batch_size: Strings per batch.
            seed: Seeds every split (each its own stream, so n_train does not change val or test).
        """
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if n_symbols < 2:
            raise ValueError(f"n_symbols must be >= 2 (one symbol makes every task trivial), got {n_symbols}")
        for name, (lo, hi) in (("train_lengths", train_lengths), ("test_lengths", test_lengths)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if min(n_train, n_val, n_test_per_length, batch_size) < 1:
            raise ValueError("n_train, n_val, n_test_per_length and batch_size must be positive")
        self.task, self.vocab = task, Vocab(n_symbols)
        self.train_lengths, self.test_lengths = tuple(train_lengths), tuple(test_lengths)
        self.n_train, self.n_val, self.n_test_per_length = n_train, n_val, n_test_per_length
        self.batch_size, self.seed = batch_size, seed
        self.splits: dict[str, TaskSet] = {}

    def _split(self, lengths: torch.Tensor, offset: int) -> TaskSet:
        g = torch.Generator().manual_seed(self.seed * 1000 + offset)
        return TaskSet(self.task, lengths, self.vocab.n_symbols, g)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        lo, hi = self.train_lengths
        g = torch.Generator().manual_seed(self.seed * 1000 + 999)
        self.splits["train"] = self._split(torch.randint(lo, hi + 1, (self.n_train,), generator=g), 0)
        self.splits["val"] = self._split(torch.randint(lo, hi + 1, (self.n_val,), generator=g), 1)
        test = torch.arange(self.test_lengths[0], self.test_lengths[1] + 1).repeat_interleave(self.n_test_per_length)
        self.splits["test"] = self._split(test, 2)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, generator=g,
                          collate_fn=lambda items: collate(items, self.vocab.pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def fingerprint(self) -> str:
        """sha256 of the task and every string of every split."""
        self.setup()
        h = hashlib.sha256(f"{self.task}|{self.vocab.n_symbols}".encode())
        for split in ("train", "val", "test"):
            h.update(split.encode())
            for s, t in zip(self.splits[split].src, self.splits[split].tgt):
                h.update(s.numpy().tobytes() + b"|" + t.numpy().tobytes())
        return h.hexdigest()
