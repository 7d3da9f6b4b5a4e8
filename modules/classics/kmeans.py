"""K-Means in NumPy: Lloyd's iterations, k-means++ seeding, empty clusters, a tolerance.

Objective (inertia): the sum over points of the squared distance to the nearest centre,

    J(C) = sum_i min_j ||x_i - c_j||^2.

Lloyd's algorithm alternates the two steps that each lower J (Lloyd 1982):

1. assignment: l_i = argmin_j ||x_i - c_j||^2 (the nearest centre; ties to the lowest j);
2. update: c_j = mean of the points with l_i = j (the minimiser of the squared distances).

A cluster left with no point keeps no mean. Like scikit-learn, its centre moves to the point
farthest from its own centre (that point leaves its old cluster's mean), so no centre is lost.

Stopping, as scikit-learn's Lloyd: stop when the assignment repeats (strict convergence), or
when the total squared centre shift sum_j ||c_j' - c_j||^2 is <= tol * mean per-feature
variance of X (so `tol` is relative to the data's scale); after a tolerance stop the points are
assigned once more, so labels and inertia belong to the returned centres.

Seeding: k-means++ (Arthur & Vassilvitskii 2007) draws the first centre uniformly and each next
one with probability proportional to D(x)^2, the squared distance to the nearest centre chosen
so far; in expectation within O(log k) of the optimal J. The greedy variant tries
`n_local_trials` candidates per draw (2 + log k by default) and keeps the one that lowers the
potential most. Drawn with `np.random.RandomState(seed)` in scikit-learn's order, so the same
seed picks the same points as `sklearn.cluster.kmeans_plusplus` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modules.classics.knn import squared_distances

INITS = ("k-means++", "random")


@dataclass
class KMeansConfig:
    """Hyper-parameters of :class:`KMeans`.

    Args:
        n_clusters: k (>= 1, <= the number of points).
        init: "k-means++" or "random" (k distinct points drawn uniformly).
        n_init: Seedings tried; the run with the lowest inertia is kept.
        max_iter: Lloyd iterations per run at most.
        tol: Relative tolerance on the total squared centre shift (see the module docstring).
        n_local_trials: Candidates per k-means++ draw; None gives 2 + int(log k).
    """

    n_clusters: int = 8
    init: str = "k-means++"
    n_init: int = 1
    max_iter: int = 300
    tol: float = 1e-4
    n_local_trials: int | None = None

    def __post_init__(self) -> None:
        if int(self.n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS} (or pass centres to fit), got {self.init!r}")
        if int(self.n_init) < 1 or int(self.max_iter) < 1:
            raise ValueError(f"n_init and max_iter must be >= 1, got {self.n_init} and {self.max_iter}")
        if not np.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol}")


def kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.RandomState,
                    n_local_trials: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-means++ seeding; returns (centres (k, d), their row indices in X (k,))."""
    n = X.shape[0]
    trials = 2 + int(np.log(k)) if n_local_trials is None else n_local_trials
    idx = np.empty(k, dtype=np.intp)
    idx[0] = rng.choice(n, p=np.full(n, 1.0 / n))  # uniform, drawn as scikit-learn draws it
    closest = squared_distances(X[idx[:1]], X)[0]  # D(x)^2 to the nearest chosen centre, (n,)
    potential = closest.sum()
    for c in range(1, k):
        # `trials` draws with probability D(x)^2 / sum D^2: inverse-CDF sampling
        cand = np.searchsorted(np.cumsum(closest), rng.uniform(size=trials) * potential)
        cand = np.minimum(cand, n - 1)
        d = np.minimum(closest, squared_distances(X[cand], X))  # (trials, n): D^2 if each were added
        best = int(np.argmin(d.sum(axis=1)))
        idx[c], closest, potential = cand[best], d[best], d[best].sum()
    return X[idx].copy(), idx


class KMeans:
    """K-Means clustering (Lloyd) with k-means++ seeding.

    After `fit`: `cluster_centers_` (k, d), `labels_` (n,), `inertia_`, `n_iter_`.

    Args:
        config: k, seeding and stopping.
        seed: Seed of the seeding (a `np.random.RandomState`, as scikit-learn's `random_state`).
    """

    def __init__(self, config: KMeansConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.cluster_centers_: np.ndarray | None = None

    def fit(self, X: np.ndarray, init_centers: np.ndarray | None = None) -> "KMeans":
        """Cluster X (n, d); `init_centers` (k, d) replaces the seeding (one run)."""
        X = np.asarray(X, dtype=np.float64)
        k = self.config.n_clusters
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ValueError(f"X must be a finite (n, d) array, got shape {X.shape}")
        if k > X.shape[0]:
            raise ValueError(f"n_clusters={k} exceeds the {X.shape[0]} points: choose n_clusters <= {X.shape[0]}")
        if init_centers is not None:
            init_centers = np.asarray(init_centers, dtype=np.float64)
            if init_centers.shape != (k, X.shape[1]):
                raise ValueError(f"init_centers must have shape ({k}, {X.shape[1]}), got {init_centers.shape}")
        tol = self.config.tol * float(np.mean(np.var(X, axis=0)))
        rng = np.random.RandomState(self.seed)
        best = None
        for _ in range(1 if init_centers is not None else self.config.n_init):
            if init_centers is not None:
                centers = init_centers.copy()
            elif self.config.init == "k-means++":
                centers, _ = kmeans_plusplus(X, k, rng, self.config.n_local_trials)
            else:
                centers = X[rng.permutation(X.shape[0])[:k]].copy()
            run = self._lloyd(X, centers, tol)
            if best is None or run[2] < best[2]:
                best = run
        self.cluster_centers_, self.labels_, self.inertia_, self.n_iter_ = best
        return self

    def _lloyd(self, X: np.ndarray, centers: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, float, int]:
        labels_old = np.full(X.shape[0], -1)
        strict = False
        for it in range(1, self.config.max_iter + 1):
            labels, d = self._assign(X, centers)  # 1. assignment
            new = self._update(X, labels, d, centers)  # 2. update
            shift = float(np.sum((new - centers) ** 2))
            centers = new
            if np.array_equal(labels, labels_old):
                strict = True
                break
            if shift <= tol:
                break
            labels_old = labels
        if not strict:  # the labels of the centres returned
            labels, d = self._assign(X, centers)
        inertia = float(np.sum(d[np.arange(X.shape[0]), labels]))
        return centers, labels, inertia, it

    @staticmethod
    def _assign(X: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = squared_distances(X, centers)  # (n, k)
        return np.argmin(d, axis=1), d

    @staticmethod
    def _update(X: np.ndarray, labels: np.ndarray, d: np.ndarray, centers: np.ndarray) -> np.ndarray:
        k = centers.shape[0]
        counts = np.bincount(labels, minlength=k).astype(np.float64)  # (k,)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, X)  # (k, d) per-cluster sums
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # each empty centre takes one of the points farthest from their own centre, farthest first
            own = d[np.arange(X.shape[0]), labels]
            if own.max() > 0:  # else: fewer distinct points than clusters, nothing to move
                far = np.argsort(-own, kind="stable")[: empty.size]
                for j, i in zip(empty, far):
                    sums[labels[i]] -= X[i]
                    counts[labels[i]] -= 1
                    sums[j], counts[j] = X[i], 1.0
        new = centers.copy()  # a cluster still empty keeps its centre
        full = counts > 0
        new[full] = sums[full] / counts[full, None]
        return new

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the nearest centre for each row of X."""
        if self.cluster_centers_ is None:
            raise RuntimeError("KMeans.predict called before fit")
        return self._assign(np.asarray(X, dtype=np.float64), self.cluster_centers_)[0]
