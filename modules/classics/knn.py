"""k-nearest-neighbour classification in NumPy: distances, a partial sort, a vote.

1. Distances. ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2: one matrix product for all pairs instead
   of an (n_query, n_train, d) difference tensor; cancellation can leave tiny negatives, clipped to 0.
2. The k nearest. `np.argpartition` finds each row's k smallest in O(n_train) without sorting the
   row; only those k are then sorted, nearest first, equal distances by training index (where the
   k-th distance is shared, the lowest indices among the tied are kept).
3. The vote. Uniform: one vote per neighbour. Distance-weighted: 1/d, and a query that coincides
   with training points (d = 0) gives weight 1 to those and 0 to the rest. The class with the
   largest score wins, the lowest class on a tie (argmax), as in scikit-learn.

Against scikit-learn's brute force: identical neighbours and predictions wherever the k-th
distance is not shared with a (k+1)-th point (every query of digits and mnist5k, tested). Where
it is shared, this file keeps the lowest indices; scikit-learn keeps what its max-heap leaves,
which depends on push order (tests/modules/classics/conftest.py replays that heap as an oracle
and the tests show the two differ only there). The fast path, blocked, threaded and with a
cheaper partial sort, is `modules/classics/knn_fast.py` (benchmarks/knn_predict.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WEIGHTS = ("uniform", "distance")


@dataclass
class KNNConfig:
    """Hyper-parameters of :class:`KNNClassifier`.

    Args:
        k: Number of neighbours (>= 1, <= training set size).
        weights: "uniform" (one vote each) or "distance" (vote 1/distance).
    """

    k: int = 5
    weights: str = "uniform"

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ValueError(f"k (number of neighbours) must be >= 1, got {self.k}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")


def squared_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2 for all pairs, (n_a, n_b), clipped at 0."""
    a2 = np.einsum("ij,ij->i", A, A)[:, None]  # (n_a, 1)
    b2 = np.einsum("ij,ij->i", B, B)[None, :]  # (1, n_b)
    return np.maximum(a2 - 2.0 * (A @ B.T) + b2, 0.0)


def nearest_k(D: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values), each (n, k): the k smallest of each row of D, nearest first, ties by index."""
    n = D.shape[1]
    ind = np.argpartition(D, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(D), 1))
    kth = np.take_along_axis(D, ind, axis=1).max(axis=1)  # (n,) the k-th smallest distance
    # where that distance is shared beyond the k-th place, argpartition's pick among the tied is
    # arbitrary: take the lowest indices there (a stable sort of those rows; rare on real data)
    tied = np.flatnonzero((D <= kth[:, None]).sum(axis=1) > k)
    ind[tied] = np.argsort(D[tied], axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(D, ind, axis=1)
    order = np.lexsort((ind, vals), axis=1)  # by distance, then by index
    return np.take_along_axis(ind, order, axis=1), np.take_along_axis(vals, order, axis=1)


class KNNClassifier:
    """Brute-force k-NN classifier with Euclidean distance.

    Args:
        config: k and weighting.
    """

    def __init__(self, config: KNNConfig) -> None:
        self.config = config
        self.X: np.ndarray | None = None  # (n, d) the stored training set
        self.y: np.ndarray | None = None  # (n,) encoded labels in [0, n_classes)
        self.classes_: np.ndarray | None = None

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "KNNClassifier":
        """Store the training set; `classes` (sorted) fixes the label set when some are absent from y."""
        X, y = np.ascontiguousarray(X, dtype=np.float64), np.asarray(y)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (n, d) and y (n,), got {X.shape} and {y.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinity")
        if self.config.k > X.shape[0]:
            raise ValueError(f"k={self.config.k} exceeds the training set size {X.shape[0]}: "
                             f"choose k <= {X.shape[0]} or use more training data")
        self.classes_ = np.unique(y) if classes is None else np.asarray(classes)
        self.y = np.searchsorted(self.classes_, y)
        if np.any(self.classes_[np.minimum(self.y, len(self.classes_) - 1)] != y):
            raise ValueError("y holds labels that are not in `classes`")
        self.X = X
        return self

    def _check_query(self, X: np.ndarray) -> np.ndarray:
        if self.X is None:
            raise RuntimeError(f"{type(self).__name__} used before fit")
        X = np.ascontiguousarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.X.shape[1]:
            raise ValueError(f"X must have shape (n, {self.X.shape[1]}), got {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinity")
        return X

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Euclidean distances (n, k), training indices (n, k)) of the k nearest, nearest first."""
        ind, d2 = nearest_k(squared_distances(self._check_query(X), self.X), self.config.k)
        return np.sqrt(d2), ind

    def class_scores(self, X: np.ndarray) -> np.ndarray:
        """Summed votes per class, (n, n_classes)."""
        dist, ind = self.kneighbors(X)
        labels, K = self.y[ind], len(self.classes_)  # (n, k)
        if self.config.weights == "uniform":
            w = np.ones_like(dist)
        else:
            with np.errstate(divide="ignore"):
                w = 1.0 / dist
            exact = np.isinf(w).any(axis=1)
            w[exact] = np.isinf(w[exact])  # a query on training points: only they vote
        # summed over the k neighbours in order, as scikit-learn's weighted_mode sums them
        return np.stack([np.sum(np.where(labels == c, w, 0.0), axis=1) for c in range(K)], axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        s = self.class_scores(X)
        return s / s.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.class_scores(X), axis=1)]  # first maximum: lowest class wins a tie
