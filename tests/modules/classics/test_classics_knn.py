"""NumPy k-NN (taught and fast path) against scikit-learn's brute-force KNeighborsClassifier.

Where the k-th distance is not shared, both paths give scikit-learn's neighbours and predictions.
Where it is, they keep the lowest indices and scikit-learn what its heap leaves: the `sklearn_heap`
oracle (conftest.py) replays that heap, and the tests show that this is the only difference.
"""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from datamodules.tabular import TabularDataModule
from modules.classics.knn import KNNClassifier, KNNConfig, nearest_k, squared_distances
from modules.classics.knn_fast import FastKNNClassifier, FastKNNConfig, _k_smallest


def _sk(k, weights, X, y):
    return KNeighborsClassifier(n_neighbors=k, weights=weights, algorithm="brute").fit(X, y)


def _both(k, weights, X, y, **fast):
    return (KNNClassifier(KNNConfig(k, weights)).fit(X, y),
            FastKNNClassifier(FastKNNConfig(k, weights, **fast)).fit(X, y))


def test_squared_distances_match_the_definition():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    np.testing.assert_allclose(squared_distances(A, B), ((A[:, None] - B[None]) ** 2).sum(-1), atol=1e-12)
    assert squared_distances(B, B).min() >= 0.0  # cancellation clipped


def test_nearest_k_orders_nearest_first_ties_by_index():
    D = np.array([[5, 3, 3, 9, 1, 7, 3, 0], [2, 2, 8, 9, 9, 9, 9, 1]], dtype=float)
    ind, d = nearest_k(D, 3)
    np.testing.assert_array_equal(ind, [[7, 4, 1], [7, 0, 1]])
    np.testing.assert_array_equal(d, [[0, 1, 3], [1, 2, 2]])
    np.testing.assert_array_equal(nearest_k(D, 8)[0][0], [7, 4, 1, 2, 6, 0, 5, 3])  # k = n: a full sort


@pytest.mark.parametrize("n, k", [(10, 3), (100, 1), (333, 5), (1000, 7)])
def test_fast_k_smallest_equals_the_taught_partial_sort(n, k):
    """The group-minimum pre-filter against argpartition + sort; ties, tail columns and negatives included."""
    rng = np.random.default_rng(n)
    D = rng.integers(0, 30, size=(40, n)).astype(float)  # many exact ties
    D[::7, -1] = -1e-14  # a cancellation negative, in the leftover tail columns when there are any
    ind, d = _k_smallest(D.copy(), k)
    ref_ind, ref_d = nearest_k(np.maximum(D, 0.0), k)
    np.testing.assert_array_equal(ind, ref_ind)
    np.testing.assert_array_equal(d, ref_d)


def test_overflowing_norms_are_refused():
    """Entries near 1e154 pass a finite check but their squared norms overflow: NaN distances
    would mix up rows, so the fast path's fit and predict refuse them by name."""
    X, y = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]), np.array([0, 1, 0])
    with pytest.raises(ValueError, match=r"training set X has 1 row\(s\) whose squared norm overflows.*row 3"):
        FastKNNClassifier(FastKNNConfig(k=1)).fit(np.vstack([X, [[1e155, 0.0]]]), np.append(y, 1))
    m = FastKNNClassifier(FastKNNConfig(k=1)).fit(X, y)
    with pytest.raises(ValueError, match="query set X .* standardize or rescale"):
        m.predict(np.array([[0.0, 0.0], [3e154, 3e154]]))


def test_a_boundary_tie_is_where_sklearn_differs(sklearn_heap):
    """Six points at squared distances [1, 1, 1, 1, 0, 0] from the query, k = 3.

    scikit-learn's heap keeps {1, 4, 5}; the lowest indices are {0, 4, 5}. With labels
    [0, 1, 0, 1, 0, 1] that is a 2:1 vote for class 1 there and for class 0 here.
    """
    X = np.array([[1.0], [-1.0], [1.0], [-1.0], [0.0], [0.0]])
    y = np.array([0, 1, 0, 1, 0, 1])
    q = np.zeros((1, 1))
    sk = _sk(3, "uniform", X, y)
    assert sorted(sklearn_heap(squared_distances(q, X), 3)[0]) == sorted(sk.kneighbors(q)[1][0]) == [1, 4, 5]
    for ours in _both(3, "uniform", X, y):
        assert sorted(ours.kneighbors(q)[1][0]) == [0, 4, 5]
        assert ours.predict(q)[0] == 0 and sk.predict(q)[0] == 1


def _grid_case(rng, n, d, n_query=15):
    X = rng.integers(0, 3, size=(n, d)).astype(float)
    y = rng.integers(0, 3, size=n) * 10 + 1  # labels 1, 11, 21: not 0..K-1
    Q = rng.integers(0, 3, size=(n_query, d)) + rng.choice([0.0, 0.5], size=(n_query, d))
    return X, y, Q


def _check_against_sklearn(X, y, Q, k, weights, sklearn_heap, **fast):
    """Equal distances everywhere; equal neighbour sets and predictions where no tie is open; where one
    is, scikit-learn's set is the heap oracle's and ours the lowest indices. Returns the open rows."""
    D = squared_distances(Q, X)  # exact: integer and half-integer coordinates
    kth = np.sort(D, axis=1)[:, k - 1]
    open_tie = (D <= kth[:, None]).sum(axis=1) > k
    sk = _sk(k, weights, X, y)
    d_sk, i_sk = sk.kneighbors(Q)
    np.testing.assert_array_equal(np.sort(sklearn_heap(D, k), axis=1), np.sort(i_sk, axis=1))  # the oracle holds
    taught, quick = _both(k, weights, X, y, **fast)
    d_ours, i_ours = taught.kneighbors(Q)
    np.testing.assert_array_equal(i_ours, quick.kneighbors(Q)[1])  # the fast path is the taught path
    np.testing.assert_array_equal(taught.predict(Q), quick.predict(Q))
    np.testing.assert_allclose(d_ours, d_sk, rtol=1e-12)
    lowest = np.sort(np.argsort(D, axis=1, kind="stable")[:, :k], axis=1)
    np.testing.assert_array_equal(np.sort(i_ours, axis=1), lowest)
    same = ~open_tie
    np.testing.assert_array_equal(np.sort(i_ours[same], axis=1), np.sort(i_sk[same], axis=1))
    np.testing.assert_array_equal(taught.predict(Q)[same], sk.predict(Q)[same])
    return int(open_tie.sum())


@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("seed", range(3))
def test_grid_ties_differ_from_sklearn_only_where_a_tie_is_open(weights, seed, sklearn_heap):
    """Points on a small integer grid: duplicates, equal distances and tied votes everywhere.
    Under 256 training points scikit-learn uses one chunk; one OpenMP thread spares its spin-waits."""
    rng = np.random.default_rng(seed)
    opened = 0
    with threadpool_limits(1, user_api="openmp"):
        for _ in range(6):
            X, y, Q = _grid_case(rng, int(rng.integers(8, 60)), int(rng.integers(1, 4)))
            for k in (1, 2, 3, 5, 7):
                if k <= len(y):
                    opened += _check_against_sklearn(X, y, Q, k, weights, sklearn_heap, block_size=4)
    assert opened > 30  # the tie rows really occurred


def test_beyond_one_distance_chunk(sklearn_heap):
    """More than 256 training points: scikit-learn splits them into chunks (and threads), and the
    fast path's candidate pre-filter is active."""
    rng = np.random.default_rng(7)
    X, y, Q = _grid_case(rng, 700, 2, n_query=40)
    y = y // 10
    for weights in ("uniform", "distance"):
        for k in (1, 3, 6, 10):
            _check_against_sklearn(X, y, Q, k, weights, sklearn_heap)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_identical_to_sklearn_on_digits(weights):
    dm = TabularDataModule("digits")
    dm.setup()
    (Xtr, ytr), (Xte, _) = dm.splits["train"], dm.splits["test"]
    for k in (1, 4, 10):
        sk = _sk(k, weights, Xtr, ytr)
        with threadpool_limits(1, user_api="openmp"):  # no ties on digits: threads cannot matter
            expected, (d_sk, i_sk) = sk.predict(Xte), sk.kneighbors(Xte)
        for ours in _both(k, weights, Xtr, ytr, block_size=100):
            np.testing.assert_array_equal(ours.predict(Xte), expected)
            d_ours, i_ours = ours.kneighbors(Xte)
            np.testing.assert_array_equal(i_ours, i_sk)  # same neighbours, same order
            np.testing.assert_allclose(d_ours, d_sk, rtol=1e-9)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_identical_to_sklearn_on_mnist5k(weights):
    """784 features and 3,000 training rows: the threaded path (a product over 1e8 multiply-adds)."""
    dm = TabularDataModule("mnist5k")
    dm.setup()
    (Xtr, ytr), (Xte, _) = dm.splits["train"], dm.splits["test"]
    expected = _sk(5, weights, Xtr, ytr).predict(Xte)
    np.testing.assert_array_equal(KNNClassifier(KNNConfig(5, weights)).fit(Xtr, ytr).predict(Xte), expected)
    for n_jobs in (None, 2):  # automatic (threads where there are CPUs for them), and 2 workers
        ours = FastKNNClassifier(FastKNNConfig(k=5, weights=weights, n_jobs=n_jobs)).fit(Xtr, ytr)
        np.testing.assert_array_equal(ours.predict(Xte), expected)


def test_block_size_and_workers_bound_memory_without_changing_results():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 3, size=50)
    Q = rng.normal(size=(100, 3))
    small = FastKNNClassifier(FastKNNConfig(k=4, block_size=5, n_jobs=1)).fit(X, y)
    big = FastKNNClassifier(FastKNNConfig(k=4, block_size=1000, n_jobs=1)).fit(X, y)
    threads = FastKNNClassifier(FastKNNConfig(k=4, block_size=20, n_jobs=3)).fit(X, y)
    expected = KNNClassifier(KNNConfig(k=4)).fit(X, y).predict(Q)
    for m in (small, big, threads):
        np.testing.assert_array_equal(m.predict(Q), expected)
    # a float64 distance block and its boolean candidate mask
    assert small.block_bytes == 5 * 50 * 9 and big.block_bytes == 100 * 50 * 9
    assert threads.block_bytes == 3 * 20 * 50 * 9  # one block buffer per worker


def test_bad_input_names_the_field():
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    for cls, cfg in ((KNNClassifier, KNNConfig), (FastKNNClassifier, FastKNNConfig)):
        with pytest.raises(ValueError, match=r"k=5 exceeds the training set size 4"):
            cls(cfg(k=5)).fit(X, y)
        m = cls(cfg(k=1)).fit(X, y)
        with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
            m.predict(np.zeros((1, 3)))
        with pytest.raises(RuntimeError, match="before fit"):
            cls(cfg(k=1)).predict(X)
    with pytest.raises(ValueError, match="k"):
        KNNConfig(k=0)
    with pytest.raises(ValueError, match="weights"):
        KNNConfig(weights="gaussian")
    with pytest.raises(ValueError, match="block_size"):
        FastKNNConfig(block_size=0)
    with pytest.raises(ValueError, match="n_jobs"):
        FastKNNConfig(n_jobs=0)
