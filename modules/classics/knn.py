"""k-nearest-neighbour classification in NumPy, tie for tie with scikit-learn's brute force.

Distances use ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2 in one matrix product per block of
queries, the norms carried as two extra columns ([-2a, ||a||^2, 1] . [b, 1, ||b||^2]), instead
of an (n_query, n_train, d) difference tensor: a block costs (block rows x n_train) floats of
memory and all its arithmetic runs in BLAS. The k smallest per row are found without sorting
or partitioning whole rows (`_k_smallest`).

How scikit-learn (1.3+, brute force, dense float64) breaks ties, and how this file matches it:

* Which neighbours. scikit-learn keeps, per query, a fixed-size max-heap of k
  (distance, index) pairs and pushes the training points in index order
  (`sklearn/utils/_heap.pyx::heap_push`): a point whose distance is >= the heap's current
  maximum is rejected, and a point that enters sifts down only past strictly larger
  children (ties going left). When more than k points share the k-th smallest distance,
  which of them survive therefore depends on that heap's history, not simply on the
  lowest indices (a "lowest index wins" rule disagrees with scikit-learn on many of the
  grid ties in the tests). Only for the query rows where such a boundary tie exists
  (rare on real data) is scikit-learn's heap replayed exactly (`_replay_heap`, vectorised
  over those rows); rows without one have a unique neighbour set.
* Which class. Uniform weights: votes per class, argmax, so the lowest class index wins a tie
  (scikit-learn's ArgKminClassMode + argmax). Distance weights: w = 1/d, and a query at
  distance 0 from some training points gives weight 1 to those and 0 to the others
  (`_get_weights`); class scores are summed as `weighted_mode` sums them (np.sum over the
  distance-sorted neighbours), the strictly larger score wins, so again the lowest class.

Limits of "identical". (1) Ties are ties only if both sides compute equal distances. They
do when the arithmetic is exact (integer-valued data, as in the tie tests). On real data the
two sides round differently in the last bits (scikit-learn adds the norms after its product,
here they are summed inside it), which could only matter where two distances lie within a
few ulps of each other at the k-th place; on digits every neighbour agrees and on mnist5k
every prediction (both tested). For duplicated
float rows the norm expansion leaves ~1e-13 instead of 0, not always the same for each copy,
while scikit-learn's uniform path subtracts directly and gets exact zeros, so ties among the
copies can break differently. (2) With distance weights, more than 256 training points and
several OpenMP threads, scikit-learn gives each thread its own heap and merges them
(`strategy="parallel_on_Y"`). This file replays the single heap, which is scikit-learn's
order for uniform weights always and for distance weights on one thread; the merged result
agreed with it in every case tried (tests: 700 points, 2 threads).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

WEIGHTS = ("uniform", "distance")
_DBL_MAX = np.finfo(np.float64).max


@functools.cache
def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool per size: starting threads per call would cost more than a block."""
    return ThreadPoolExecutor(workers, thread_name_prefix="knn")


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.cache
def _controller():
    """threadpoolctl's controller, built once: building it scans the loaded libraries."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _blas_threads(n: int):
    """Context limiting BLAS to n threads."""
    return _controller().limit(limits=n, user_api="blas")


@dataclass
class KNNConfig:
    """Hyper-parameters of :class:`KNNClassifier`.

    Args:
        k: Number of neighbours (>= 1, <= training set size).
        weights: "uniform" (one vote each) or "distance" (vote 1/distance).
        block_size: Query rows per distance block; memory per block is
            block_size * n_train * 9 bytes per worker (the float64 distances and the boolean
            candidate mask), plus the candidates (a few per row) and, per call, the
            (n_query, d + 2) query matrix.
        n_jobs: Worker threads, each taking a contiguous share of the queries with a
            one-thread BLAS (scikit-learn's own layout: OpenMP over chunks, BLAS limited to
            one thread). None: one worker per usable CPU when the distance product is large
            (>= 1e8 multiply-adds), else a single thread whose matrix product BLAS
            parallelises.
    """

    k: int = 5
    weights: str = "uniform"
    block_size: int = 512
    n_jobs: int | None = None

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ValueError(f"k (number of neighbours) must be >= 1, got {self.k}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if int(self.block_size) < 1:
            raise ValueError(f"block_size (query rows per distance block) must be >= 1, got {self.block_size}")
        if self.n_jobs is not None and int(self.n_jobs) < 1:
            raise ValueError(f"n_jobs (worker threads) must be >= 1 or None (automatic), got {self.n_jobs}")


def _query_side(A: np.ndarray, A_sqnorm: np.ndarray) -> np.ndarray:
    """[-2 A, ||a||^2, 1] (n_a, d + 2): the query half of the one-product distance."""
    out = np.empty((A.shape[0], A.shape[1] + 2))
    np.multiply(A, -2.0, out=out[:, :-2])  # exact: a power of two
    out[:, -2] = A_sqnorm
    out[:, -1] = 1.0
    return out


def _sqnorm(X: np.ndarray, what: str) -> np.ndarray:
    """Squared row norms, refusing rows so large that a distance would overflow to inf/NaN.

    Every term of ||a||^2 - 2 a.b + ||b||^2 is at most ||a||^2 + ||b||^2 in size, so norms
    under a quarter of float64's range keep the whole product finite; larger ones (entries
    around 1e153 and up) would turn distances into NaN and silently corrupt the search.
    """
    with np.errstate(over="ignore"):
        sq = np.einsum("ij,ij->i", X, X)
        ok = np.isfinite(4.0 * sq)
    if not ok.all():
        raise ValueError(
            f"{what} has {int((~ok).sum())} row(s) whose squared norm overflows float64 "
            f"(first: row {int(np.flatnonzero(~ok)[0])}); standardize or rescale the features"
        )
    return sq


def _train_side(B: np.ndarray, B_sqnorm: np.ndarray) -> np.ndarray:
    """[B, 1, ||b||^2] (n_b, d + 2): the training half, built once at fit."""
    out = np.empty((B.shape[0], B.shape[1] + 2))
    out[:, :-2] = B
    out[:, -2] = 1.0
    out[:, -1] = B_sqnorm
    return out


def squared_distances(
    A: np.ndarray,
    B: np.ndarray,
    A_sqnorm: np.ndarray | None = None,
    B_sqnorm: np.ndarray | None = None,
    clip: bool = True,
) -> np.ndarray:
    """||a_i - b_j||^2 for all pairs, (n_a, n_b), via the norm expansion in one product.

    [-2a, ||a||^2, 1] . [b, 1, ||b||^2] = ||a||^2 - 2 a.b + ||b||^2: the norms ride along as
    two extra columns of the matrix product, so BLAS forms the whole sum and no pass over
    the (n_a, n_b) result is spent adding them (a third of the k-NN search time on digits
    when added separately). `clip` removes tiny negatives left by cancellation (the k-NN
    search clips only the rows that have any, see `_k_smallest`).
    """
    a2 = np.einsum("ij,ij->i", A, A) if A_sqnorm is None else A_sqnorm  # (n_a,)
    b2 = np.einsum("ij,ij->i", B, B) if B_sqnorm is None else B_sqnorm  # (n_b,)
    d = _query_side(A, a2) @ _train_side(B, b2).T
    if clip:
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


def _k_smallest(D: np.ndarray, k: int, group: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k smallest entries of each row of D, nearest first, and the rows with a boundary tie.

    Partitioning whole rows is the slow part of brute-force k-NN (numpy's argpartition costs
    about 10 us per 1,000-column row), so a bound is found first and only the entries under it
    are ordered. The first g * group columns (g = n // group) form g interleaved groups,
    group i = columns {i, i + g, i + 2g, ...}; their minima come from `group` element-wise
    minimum passes (b, g). With u the k-th smallest group minimum (a cheap value partition of
    g entries per row), k distinct columns lie at or below u, so the k nearest are among the
    entries <= u: typically a handful per row. Those are gathered flat and sorted once by
    (row, distance, column index), so the first k of each row are its neighbours in order.

    Rows of D with negative entries (cancellation) are clipped to 0 here, in place, as
    scikit-learn clips before its heap: clipped values tie at 0 in both.

    Args:
        D: Squared distances (b, n), possibly unclipped; modified in place.
        k: Neighbours per row.
        group: Columns per group (= passes of the pre-filter).

    Returns:
        (ind (b, k) column indices of the k smallest, nearest first and equal distances by
        index; their values (b, k); rows (m,) where more than k entries are <= the k-th
        smallest, i.e. where the choice among equal distances is open).
    """
    b, n = D.shape
    g = n // group
    if g < k:  # small training set: the bound is the k-th smallest itself
        np.maximum(D, 0.0, out=D)
        u = np.partition(D, k - 1, axis=1)[:, k - 1]
    else:
        gmin = D[:, :g].copy()  # (b, g)
        for j in range(1, group):
            np.minimum(gmin, D[:, j * g : (j + 1) * g], out=gmin)
        low = gmin.min(axis=1)
        if g * group < n:
            low = np.minimum(low, D[:, g * group :].min(axis=1))
        neg = np.flatnonzero(low < 0.0)  # rows with a cancellation negative: clip them
        if neg.size:
            D[neg] = np.maximum(D[neg], 0.0)
            gmin[neg] = np.maximum(gmin[neg], 0.0)  # min of clipped values = clipped min
        u = np.partition(gmin, k - 1, axis=1)[:, k - 1]  # (b,) bound on the k-th smallest
    # flat indices, row-major: >= k entries per row (flatnonzero is ~15x faster than a 2-D nonzero)
    flat = np.flatnonzero(D <= u[:, None])
    rows, cols = np.divmod(flat, n)
    vals = D.ravel()[flat]
    order = np.lexsort((cols, vals, rows))
    counts = np.bincount(rows, minlength=b)
    starts = np.cumsum(counts) - counts
    sel = order[starts[:, None] + np.arange(k)]  # (b, k) the first k of each row
    d = vals[sel]
    nxt = vals[order[np.minimum(starts + k, order.size - 1)]]  # the (k+1)-th, where a row has one
    tied = np.flatnonzero((counts > k) & (nxt == d[:, -1]))
    return cols[sel], d, tied


class KNNClassifier:
    """Brute-force k-NN classifier with Euclidean distance.

    Args:
        config: k, weighting and block size.
    """

    def __init__(self, config: KNNConfig) -> None:
        self.config = config
        self.X: np.ndarray | None = None  # (n, d) view into `train_side`
        self.y: np.ndarray | None = None  # encoded labels in [0, n_classes)
        self.classes_: np.ndarray | None = None
        self.train_side: np.ndarray | None = None  # [X, 1, ||x||^2], the stored training set
        self.block_bytes = 0  # bytes of the largest distance blocks and masks, for the memory ledger
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
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinity")
        if self.config.k > X.shape[0]:
            raise ValueError(
                f"k={self.config.k} exceeds the training set size {X.shape[0]}: "
                f"choose k <= {X.shape[0]} or use more training data"
            )
        self.classes_ = np.unique(y) if classes is None else np.asarray(classes)
        self.y = np.searchsorted(self.classes_, y)
        if np.any(self.classes_[np.minimum(self.y, len(self.classes_) - 1)] != y):
            raise ValueError("y holds labels that are not in `classes`")
        self.train_side = _train_side(X, _sqnorm(X, "the training set X"))
        self.X = self.train_side[:, :-2]
        if self.config.n_jobs != 1:
            _controller()  # one-off library scan (~10 ms) belongs to fitting, not to predict
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
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinity")
        n, k = X.shape[0], self.config.k
        dist = np.empty((n, k))
        ind = np.empty((n, k), dtype=np.intp)
        Q = _query_side(X, _sqnorm(X, "the query set X"))
        jobs = self.config.n_jobs
        if jobs is None:
            # Worker threads pay off only for large products: each call wakes them, which on
            # a virtual machine costs more than a small search (digits, 360 x 1078 x 64:
            # 2.2 ms with two workers against 1.4 ms in one thread whose product BLAS
            # threads by itself). Each worker needs a few dozen rows too.
            big = n * self.X.shape[0] * self.X.shape[1] >= 1e8
            jobs = max(1, min(_usable_cpus(), n // 32)) if big else 1
        parts = max(1, min(jobs, n))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        args = [(Q[lo:hi], dist[lo:hi], ind[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        if parts == 1:
            stats = [self._kneighbors_part(*args[0])]
        else:
            # BLAS limited to one thread while the workers run, as scikit-learn does: a
            # multi-threaded BLAS inside threads oversubscribes the cores, and two threads
            # calling OpenBLAS at once queue on its lock (digits: 2.0 ms -> 1.5 ms per predict)
            with _blas_threads(1):
                # the calling thread takes the first share itself: one thread fewer to wake
                futures = [_executor(parts - 1).submit(self._kneighbors_part, *a) for a in args[1:]]
                stats = [self._kneighbors_part(*args[0])] + [f.result() for f in futures]
        self.block_bytes = max(self.block_bytes, sum(b for b, _ in stats))
        self.n_replayed += sum(r for _, r in stats)
        return dist, ind

    def _kneighbors_part(self, Q: np.ndarray, dist: np.ndarray, ind: np.ndarray) -> tuple[int, int]:
        """kneighbors for one worker's query rows Q ([-2x, ||x||^2, 1]), written into dist/ind;
        returns (block bytes, replayed rows)."""
        k, bs, n = self.config.k, self.config.block_size, Q.shape[0]
        # one buffer for every block: fresh multi-MB temporaries cost more in page faults
        # than the arithmetic on them
        buf = np.empty((min(bs, n), self.X.shape[0]))
        replayed = 0
        for s in range(0, n, bs):
            D = np.matmul(Q[s : s + bs], self.train_side.T, out=buf[: min(bs, n - s)])  # (b, n_train)
            part, d, tied = _k_smallest(D, k)
            if tied.size:
                # scikit-learn's choice among the tied, then nearest first, ties in order of
                # index like the other rows (equal distances carry equal weights, so their
                # order does not change any vote)
                p = _replay_heap(D[tied], k)
                v = np.take_along_axis(D[tied], p, axis=1)
                order = np.lexsort((p, v), axis=1)
                part[tied] = np.take_along_axis(p, order, axis=1)
                d[tied] = np.take_along_axis(v, order, axis=1)
                replayed += tied.size
            ind[s : s + bs] = part
            dist[s : s + bs] = np.sqrt(d)
        return buf.nbytes + buf.size, replayed  # + the boolean candidate mask of a block

    @staticmethod
    def _distance_weights(dist: np.ndarray) -> np.ndarray:
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
        n_classes = len(self.classes_)
        if self.config.weights == "uniform":
            # integer vote counts are exact in any order: one bincount over (row, class) cells
            cells = labels + n_classes * np.arange(len(labels))[:, None]
            return np.bincount(cells.ravel(), minlength=len(labels) * n_classes).reshape(-1, n_classes).astype(float)
        w = self._distance_weights(dist)
        # one column per class, summed like scikit-learn's weighted_mode (np.sum over k)
        # float sums depend on association: sum exactly as weighted_mode does (np.sum over k)
        return np.stack([np.sum(np.where(labels == c, w, 0.0), axis=1) for c in range(n_classes)], axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        s = self.class_scores(X)
        return s / s.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        # argmax returns the first maximum: the lowest class wins a tied vote
        return self.classes_[np.argmax(self.class_scores(X), axis=1)]
