"""NumPy K-Means against scikit-learn's KMeans: same seeding, same assignments, same inertia."""

import numpy as np
import pytest
from sklearn.cluster import KMeans as SkKMeans
from sklearn.cluster import kmeans_plusplus as sk_kmeans_plusplus
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import adjusted_rand_score

from modules.classics.kmeans import KMeans, KMeansConfig, kmeans_plusplus


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float64), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_plusplus_picks_sklearns_points(digits, seed):
    X, _ = digits
    centers, idx = kmeans_plusplus(X, 10, np.random.RandomState(seed))
    sk_centers, sk_idx = sk_kmeans_plusplus(X, 10, random_state=seed)
    np.testing.assert_array_equal(idx, sk_idx)
    np.testing.assert_array_equal(centers, sk_centers)


@pytest.mark.parametrize("tol", [1e-4, 0.0])
@pytest.mark.parametrize("data", ["digits", "blobs"])
def test_same_initial_centres_give_sklearns_assignments_and_inertia(digits, data, tol):
    if data == "digits":
        X, _ = digits
        k = 10
    else:
        X, _ = make_blobs(600, n_features=3, centers=5, cluster_std=2.5, random_state=3)
        k = 7  # more centres than blobs: clusters compete
    init, _ = sk_kmeans_plusplus(X, k, random_state=4)
    ours = KMeans(KMeansConfig(k, tol=tol)).fit(X, init_centers=init)
    sk = SkKMeans(k, init=init, n_init=1, tol=tol, algorithm="lloyd").fit(X)
    np.testing.assert_array_equal(ours.labels_, sk.labels_)
    assert ours.inertia_ == pytest.approx(sk.inertia_, rel=1e-6)
    np.testing.assert_allclose(ours.cluster_centers_, sk.cluster_centers_, atol=1e-8)
    assert ours.n_iter_ == sk.n_iter_ > 1
    np.testing.assert_array_equal(ours.predict(X), sk.predict(X))


def test_an_empty_cluster_takes_the_farthest_point_like_sklearn():
    """One initial centre far from every point wins no point in the first assignment."""
    X, _ = make_blobs(300, n_features=2, centers=3, random_state=0)
    init = np.vstack([X[[0, 1, 2]], [[1e3, 1e3]]])
    ours = KMeans(KMeansConfig(4)).fit(X, init_centers=init)
    sk = SkKMeans(4, init=init, n_init=1, algorithm="lloyd").fit(X)
    assert np.bincount(ours.labels_, minlength=4).min() > 0  # the far centre was moved and kept
    np.testing.assert_array_equal(ours.labels_, sk.labels_)
    assert ours.inertia_ == pytest.approx(sk.inertia_, rel=1e-6)


def test_adjusted_rand_index_on_digits_matches_sklearn(digits):
    """Seeded end to end (k-means++ with local trials, ten seedings, best inertia kept)."""
    X, y = digits
    ours = KMeans(KMeansConfig(10, n_init=10), seed=0).fit(X)
    sk = SkKMeans(10, n_init=10, random_state=0).fit(X)
    ari_ours, ari_sk = adjusted_rand_score(y, ours.labels_), adjusted_rand_score(y, sk.labels_)
    assert ari_ours == pytest.approx(ari_sk, abs=1e-9) and 0.5 < ari_ours < 0.9  # benchmarks/kmeans_digits.py
    assert ours.inertia_ == pytest.approx(sk.inertia_, rel=1e-6)


def test_lloyd_never_raises_the_inertia(digits):
    X, _ = digits
    init, _ = kmeans_plusplus(X, 10, np.random.RandomState(5))
    inertias = [KMeans(KMeansConfig(10, max_iter=i, tol=0.0)).fit(X, init_centers=init).inertia_ for i in range(1, 8)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(inertias, inertias[1:])) and inertias[-1] < inertias[0]


def test_bad_input_names_the_problem():
    X = np.zeros((5, 2))
    with pytest.raises(ValueError, match="n_clusters=6 exceeds the 5 points"):
        KMeans(KMeansConfig(6)).fit(X)
    with pytest.raises(ValueError, match=r"init_centers must have shape \(2, 2\)"):
        KMeans(KMeansConfig(2)).fit(X, init_centers=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="init"):
        KMeansConfig(init="forgy")
    with pytest.raises(ValueError, match="tol"):
        KMeansConfig(tol=-1.0)
    with pytest.raises(RuntimeError, match="before fit"):
        KMeans(KMeansConfig(2)).predict(X)
