"""k-nearest-neighbour classification in NumPy, tie for tie with scikit-learn's brute force.

Distances use ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2: one matrix product per block of
queries instead of an (n_query, n_train, d) difference tensor, so a block costs
(block rows x n_train) floats of memory and the product runs in BLAS.

How scikit-learn (1.3+, brute force, dense float64) breaks ties, and how this file matches it:

* Which neighbours. scikit-learn keeps, per query, a fixed-size max-heap of k
  (distance, index) pairs and pushes the training points in index order
  (`sklearn/utils/_heap.pyx::heap_push`): a point whose distance is >= the heap's current
  maximum is rejected, and a point that enters sifts down only past strictly larger
  children (ties going left). When more than k points share the k-th smallest distance,
  which of them survive therefore depends on that heap's history, not simply on the
  lowest indices. Here the k smallest are taken with argpartition; only for the query rows
  where such a tie exists (rare on real data) is scikit-learn's heap replayed exactly
  (`_replay_heap`, vectorised over those rows). Rows without a boundary tie have a unique
  neighbour set, so both agree by construction.
* Which class. Uniform weights: votes per class, argmax, so the lowest class index wins a tie
  (scikit-learn's ArgKminClassMode + argmax). Distance weights: w = 1/d, and a query at
  distance 0 from some training points gives weight 1 to those and 0 to the others
  (`_get_weights`); class scores are summed as `weighted_mode` sums them (np.sum over the
  distance-sorted neighbours), the strictly larger score wins, so again the lowest class.

Caveat, scikit-learn's side: with distance weights and more than 256 training points,
scikit-learn may split the training set across OpenMP threads with one heap each and then
merge the heaps (`strategy="parallel_on_Y"`), so which of several equally distant boundary
neighbours it keeps can depend on its thread count. This file follows the single-heap order,
which is scikit-learn's result for uniform weights always, and for distance weights on one
OpenMP thread or up to 256 training points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WEIGHTS = ("uniform", "distance")
_DBL_MAX = np.finfo(np.float64).max


@dataclass
class KNNConfig:
    """Hyper-parameters of :class:`KNNClassifier`.

    Args:
        k: Number of neighbours (>= 1, <= training set size).
        weights: "uniform" (one vote each) or "distance" (vote 1/distance).
        block_size: Query rows per distance block; memory per block is
            block_size * n_train * 8 bytes.
    """

    k: int = 5
    weights: str = "uniform"
    block_size: int = 256

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ValueError(f"k (number of neighbours) must be >= 1, got {self.k}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size (query rows per distance block) must be >= 1, got {self.block_size}")


def squared_distances(A: np.ndarray, B: np.ndarray, B_sqnorm: np.ndarray | None = None) -> np.ndarray:
    """||a_i - b_j||^2 for all pairs, (n_a, n_b), via the norm expansion, clipped at 0.

    The sum is formed as (||a||^2 - 2 a.b) + ||b||^2, the order scikit-learn's
    EuclideanArgKmin uses; the clip removes tiny negatives from cancellation.
    """
    a2 = np.einsum("ij,ij->i", A, A)  # (n_a,)
    b2 = np.einsum("ij,ij->i", B, B) if B_sqnorm is None else B_sqnorm  # (n_b,)
    d = a2[:, None] + (-2.0 * (A @ B.T))
    d += b2[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _replay_heap(D: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's `heap_push` max-heap, replayed over the columns of D in index order.

    Args:
        D: Distances (m, n) of the m query rows to replay.
        k: Heap size.

    Returns:
        Indices (m, k) of the points left in each heap (unordered).
    """
    m, n = D.shape
    vals = np.full((m, k), _DBL_MAX)
    idx = np.zeros((m, k), dtype=np.intp)
    for j in range(n):
        v = D[:, j]
        rows = np.flatnonzero(v < vals[:, 0])  # `if val >= values[0]: return`
        if rows.size == 0:
            continue
        val = v[rows]
        cur = np.zeros(rows.size, dtype=np.intp)
        moving = np.ones(rows.size, dtype=bool)
        while moving.any():
            r, c, x = rows[moving], cur[moving], val[moving]
            left = 2 * c + 1
            right = left + 1
            lv = vals[r, np.minimum(left, k - 1)]
            rv = vals[r, np.minimum(right, k - 1)]
            no_left = left >= k
            only_left = ~no_left & (right >= k)
            both = ~no_left & ~only_left
            go_left = (only_left & (lv > x)) | (both & (lv >= rv) & (x < lv))
            go_right = both & (lv < rv) & (x < rv)
            swap = np.where(go_left, left, right)
            step = go_left | go_right
            # parent takes the child's value, the pushed value moves down
            rs, cs, ss = r[step], c[step], swap[step]
            vals[rs, cs] = vals[rs, ss]
            idx[rs, cs] = idx[rs, ss]
            sub = np.flatnonzero(moving)
            cur[sub[step]] = ss
            moving[sub[~step]] = False
        vals[rows, cur] = val
        idx[rows, cur] = j
    return idx


class KNNClassifier:
    """Brute-force k-NN classifier with Euclidean distance.

    Args:
        config: k, weighting and block size.
    """

    def __init__(self, config: KNNConfig) -> None:
        self.config = config
        self.X: np.ndarray | None = None
        self.y: np.ndarray | None = None  # encoded labels in [0, n_classes)
        self.classes_: np.ndarray | None = None
        self.sqnorm: np.ndarray | None = None
        self.block_bytes = 0  # bytes of the largest distance block, for the memory ledger
        self.n_replayed = 0  # query rows that needed the tie replay (diagnostics)

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "KNNClassifier":
        """Store the training set.

        Args:
            X: Training inputs (n, d).
            y: Training labels (n,).
            classes: All class labels, sorted; defaults to those present in y. Passing them
                keeps predict_proba's columns fixed when a class is absent from y.
        """
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (n, d) and y (n,), got {X.shape} and {y.shape}")
        if self.config.k > X.shape[0]:
            raise ValueError(
                f"k={self.config.k} exceeds the training set size {X.shape[0]}: "
                f"choose k <= {X.shape[0]} or use more training data"
            )
        self.classes_ = np.unique(y) if classes is None else np.asarray(classes)
        self.y = np.searchsorted(self.classes_, y)
        if np.any(self.classes_[np.minimum(self.y, len(self.classes_) - 1)] != y):
            raise ValueError("y holds labels that are not in `classes`")
        self.X = X
        self.sqnorm = np.einsum("ij,ij->i", X, X)
        return self

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances and indices of the k nearest training points, nearest first.

        Returns:
            (dist (n, k), ind (n, k)); dist is Euclidean (not squared).
        """
        if self.X is None:
            raise RuntimeError("KNNClassifier.kneighbors called before fit")
        X = np.ascontiguousarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.X.shape[1]:
            raise ValueError(f"X must have shape (n, {self.X.shape[1]}), got {X.shape}")
        k, bs = self.config.k, self.config.block_size
        dist = np.empty((X.shape[0], k))
        ind = np.empty((X.shape[0], k), dtype=np.intp)
        for s in range(0, X.shape[0], bs):
            D = squared_distances(X[s : s + bs], self.X, self.sqnorm)  # (b, n_train)
            self.block_bytes = max(self.block_bytes, D.nbytes)
            rows = np.arange(D.shape[0])[:, None]
            part = np.argpartition(D, k - 1, axis=1)[:, :k]  # (b, k), k smallest, any order
            kth = D[rows, part].max(axis=1)  # k-th smallest distance
            n_le = np.count_nonzero(D <= kth[:, None], axis=1)
            tied = np.flatnonzero(n_le > k)  # more candidates than slots: heap decides
            if tied.size:
                part[tied] = _replay_heap(D[tied], k)
                self.n_replayed += tied.size
            d = D[rows, part]
            # nearest first; ties in order of index (equal distances carry equal weights,
            # so their order does not change any vote)
            order = np.lexsort((part, d), axis=1)
            ind[s : s + bs] = np.take_along_axis(part, order, axis=1)
            dist[s : s + bs] = np.sqrt(np.take_along_axis(d, order, axis=1))
        return dist, ind

    def _weights(self, dist: np.ndarray) -> np.ndarray:
        if self.config.weights == "uniform":
            return np.ones_like(dist)
        with np.errstate(divide="ignore"):
            w = 1.0 / dist
        inf = np.isinf(w)
        exact = inf.any(axis=1)
        # a query that coincides with training points: only those vote (scikit-learn's rule)
        w[exact] = inf[exact]
        return w

    def class_scores(self, X: np.ndarray) -> np.ndarray:
        """Summed votes per class, (n, n_classes)."""
        dist, ind = self.kneighbors(X)
        labels = self.y[ind]  # (n, k)
        w = self._weights(dist)
        # one column per class, summed like scikit-learn's weighted_mode (np.sum over k)
        return np.stack(
            [np.sum(np.where(labels == c, w, 0.0), axis=1) for c in range(len(self.classes_))], axis=1
        )

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        s = self.class_scores(X)
        return s / s.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        # argmax returns the first maximum: the lowest class wins a tied vote
        return self.classes_[np.argmax(self.class_scores(X), axis=1)]
