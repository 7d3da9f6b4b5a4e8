"""NumPy k-NN: predictions identical to scikit-learn's brute-force KNeighborsClassifier, ties included."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from datamodules.tabular import TabularDataModule
from modules.classics.knn import KNNClassifier, KNNConfig, _k_smallest, _replay_heap, squared_distances


def _sk(k, weights, X, y):
    return KNeighborsClassifier(n_neighbors=k, weights=weights, algorithm="brute").fit(X, y)


def test_squared_distances_match_the_definition():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    np.testing.assert_allclose(squared_distances(A, B), ((A[:, None] - B[None]) ** 2).sum(-1), atol=1e-12)
    assert squared_distances(B, B).min() >= 0.0  # cancellation clipped


@pytest.mark.parametrize("n, k", [(10, 3), (100, 1), (333, 5), (1000, 7)])
def test_k_smallest_prefilter_finds_the_k_smallest(n, k):
    """The group-minimum pre-filter against a full sort; tail columns and negatives included."""
    rng = np.random.default_rng(n)
    D = rng.random((40, n))
    D[::7, -1] = -1e-14  # a cancellation negative, in the leftover tail columns when there are any
    D[3, :5] = 1e-3 * rng.random(5)  # the nearest all in one group
    part, d, tied = _k_smallest(D.copy(), k)
    expected = np.sort(np.argsort(np.maximum(D, 0.0), axis=1)[:, :k], axis=1)
    np.testing.assert_array_equal(np.sort(part, axis=1), expected)
    np.testing.assert_array_equal(np.sort(d, axis=1), np.sort(np.take_along_axis(np.maximum(D, 0.0), expected, 1), 1))
    assert tied.size == 0 and d.min() >= 0.0


def test_k_smallest_orders_nearest_first_and_flags_boundary_ties():
    """Integer distances with ties: the k come out nearest first, equal distances by index, and
    exactly the rows where more than k entries reach the k-th distance are flagged."""
    D = np.array([
        [5, 3, 3, 9, 1, 7, 3, 8, 6, 4, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0],
        [2, 2, 8, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 1, 9],
    ], dtype=float)  # 33 columns, groups of 16: two groups and a leftover column
    ind, d, tied = _k_smallest(D.copy(), 3, group=16)
    np.testing.assert_array_equal(ind, [[32, 4, 1], [31, 0, 1]])
    np.testing.assert_array_equal(d, [[0, 1, 3], [1, 2, 2]])
    np.testing.assert_array_equal(tied, [0])  # row 0: 3 at columns 1, 2 and 6 compete for one place
    ind, d, tied = _k_smallest(D[:, :6].copy(), 2)  # fewer groups than k: the plain path
    np.testing.assert_array_equal(ind, [[4, 1], [0, 1]])
    np.testing.assert_array_equal(tied, [0])


def test_overflowing_norms_are_refused():
    """Entries near 1e154 pass a finite check but their squared norms overflow: NaN distances
    would mix up rows, so both fit and predict refuse them by name."""
    X, y = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]), np.array([0, 1, 0])
    with pytest.raises(ValueError, match=r"training set X has 1 row\(s\) whose squared norm overflows.*row 3"):
        KNNClassifier(KNNConfig(k=1)).fit(np.vstack([X, [[1e155, 0.0]]]), np.append(y, 1))
    m = KNNClassifier(KNNConfig(k=1)).fit(X, y)
    with pytest.raises(ValueError, match="query set X .* standardize or rescale"):
        m.predict(np.array([[0.0, 0.0], [3e154, 3e154]]))


def test_heap_order_decides_boundary_ties():
    """Six points at squared distances [1, 1, 1, 1, 0, 0] from the query, k = 3.

    scikit-learn's heap keeps {1, 4, 5}, not the lowest indices {0, 4, 5}: with labels
    [0, 1, 0, 1, 0, 1] that is a vote of 2:1 for class 1 instead of 2:1 for class 0.
    """
    X = np.array([[1.0], [-1.0], [1.0], [-1.0], [0.0], [0.0]])
    y = np.array([0, 1, 0, 1, 0, 1])
    q = np.zeros((1, 1))
    assert sorted(_replay_heap(squared_distances(q, X), 3)[0]) == [1, 4, 5]
    ours = KNNClassifier(KNNConfig(k=3)).fit(X, y)
    assert sorted(ours.kneighbors(q)[1][0]) == sorted(_sk(3, "uniform", X, y).kneighbors(q)[1][0]) == [1, 4, 5]
    assert ours.predict(q)[0] == _sk(3, "uniform", X, y).predict(q)[0] == 1


@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("seed", range(3))
def test_identical_to_sklearn_with_constructed_ties(weights, seed):
    """Points on a small integer grid: duplicates, equal distances and tied votes everywhere.

    Integer coordinates keep every distance exact in both implementations, so only the
    tie-breaking rules can make them differ. Queries on the grid hit zero distances too.
    Under 256 training points scikit-learn uses one chunk whatever its thread count; one
    OpenMP thread only spares its spin-waits on a busy machine (30x faster here).
    """
    rng = np.random.default_rng(seed)
    replayed = 0
    with threadpool_limits(1, user_api="openmp"):
        for _ in range(10):
            n, d = int(rng.integers(8, 60)), int(rng.integers(1, 4))
            X = rng.integers(0, 3, size=(n, d)).astype(float)
            y = rng.integers(0, 3, size=n) * 10 + 1  # labels 1, 11, 21: not 0..K-1
            Q = rng.integers(0, 3, size=(15, d)) + rng.choice([0.0, 0.5], size=(15, d))
            for k in (1, 2, 3, 4, 5, 7):
                ours = KNNClassifier(KNNConfig(k=k, weights=weights, block_size=4)).fit(X, y)
                np.testing.assert_array_equal(ours.predict(Q), _sk(k, weights, X, y).predict(Q))
                replayed += ours.n_replayed
    assert replayed > 100  # the tie path really ran


def test_identical_to_sklearn_beyond_one_distance_chunk():
    """More than 256 training points: scikit-learn splits them into chunks (and threads);
    here the candidate pre-filter of `_k_smallest` is active too."""
    rng = np.random.default_rng(7)
    X = rng.integers(0, 3, size=(700, 2)).astype(float)
    y = rng.integers(0, 4, size=700)
    Q = rng.integers(0, 3, size=(40, 2)) + rng.choice([0.0, 0.5], size=(40, 2))
    for weights in ("uniform", "distance"):
        for k in (1, 3, 6, 10):
            sk = _sk(k, weights, X, y)
            ours = KNNClassifier(KNNConfig(k=k, weights=weights)).fit(X, y)
            np.testing.assert_array_equal(ours.predict(Q), sk.predict(Q))
            for a, b in zip(ours.kneighbors(Q)[1], sk.kneighbors(Q)[1]):
                assert set(a) == set(b)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_identical_to_sklearn_on_digits(weights):
    dm = TabularDataModule("digits")
    dm.setup()
    (Xtr, ytr), (Xte, _) = dm.splits["train"], dm.splits["test"]
    for k in (1, 4, 10):
        ours = KNNClassifier(KNNConfig(k=k, weights=weights, block_size=100)).fit(Xtr, ytr)
        sk = _sk(k, weights, Xtr, ytr)
        with threadpool_limits(1, user_api="openmp"):  # no ties on digits: threads cannot matter
            np.testing.assert_array_equal(ours.predict(Xte), sk.predict(Xte))
            d_ours, i_ours = ours.kneighbors(Xte)
            d_sk, i_sk = sk.kneighbors(Xte)
        np.testing.assert_array_equal(i_ours, i_sk)  # no ties here: same neighbours, same order
        np.testing.assert_allclose(d_ours, d_sk, rtol=1e-9)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_identical_to_sklearn_on_mnist5k(weights):
    """784 features and 3,000 training rows: the threaded path (a product over 1e8 multiply-adds)."""
    dm = TabularDataModule("mnist5k")
    dm.setup()
    (Xtr, ytr), (Xte, _) = dm.splits["train"], dm.splits["test"]
    expected = _sk(5, weights, Xtr, ytr).predict(Xte)
    for n_jobs in (None, 2):  # automatic (threads where there are CPUs for them), and 2 workers
        ours = KNNClassifier(KNNConfig(k=5, weights=weights, n_jobs=n_jobs)).fit(Xtr, ytr)
        np.testing.assert_array_equal(ours.predict(Xte), expected)


def test_block_size_and_workers_bound_memory_without_changing_results():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 3, size=50)
    Q = rng.normal(size=(100, 3))
    small = KNNClassifier(KNNConfig(k=4, block_size=5, n_jobs=1)).fit(X, y)
    big = KNNClassifier(KNNConfig(k=4, block_size=1000, n_jobs=1)).fit(X, y)
    threads = KNNClassifier(KNNConfig(k=4, block_size=20, n_jobs=3)).fit(X, y)
    expected = small.predict(Q)
    np.testing.assert_array_equal(big.predict(Q), expected)
    np.testing.assert_array_equal(threads.predict(Q), expected)
    # a float64 distance block and its boolean candidate mask
    assert small.block_bytes == 5 * 50 * 9 and big.block_bytes == 100 * 50 * 9
    assert threads.block_bytes == 3 * 20 * 50 * 9  # one block buffer per worker


def test_bad_input_names_the_field():
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"k=5 exceeds the training set size 4"):
        KNNClassifier(KNNConfig(k=5)).fit(X, y)
    with pytest.raises(ValueError, match="k"):
        KNNConfig(k=0)
    with pytest.raises(ValueError, match="weights"):
        KNNConfig(weights="gaussian")
    with pytest.raises(ValueError, match="block_size"):
        KNNConfig(block_size=0)
    with pytest.raises(ValueError, match="n_jobs"):
        KNNConfig(n_jobs=0)
    m = KNNClassifier(KNNConfig(k=1)).fit(X, y)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        m.predict(np.zeros((1, 3)))
