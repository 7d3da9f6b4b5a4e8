"""The fast path of `modules.classics.knn`: the same neighbours and votes, blocked, threaded, cheaper to sort.

What it changes, and why (benchmarks/knn_predict.py measures it against scikit-learn):

* Distances come from one matrix product with the norms carried as two extra columns
  ([-2a, ||a||^2, 1] . [b, 1, ||b||^2]), so BLAS forms the whole sum and no pass over the
  (n_query, n_train) block is spent adding them; the training half is built once at fit.
* Queries run in blocks of `block_size` rows into one reused buffer, bounding memory to
  block_size x n_train floats per worker, and over `n_jobs` threads with a one-thread BLAS
  (scikit-learn's own layout).
* The k smallest per row come from a group-minimum pre-filter and one sort of the few
  candidates (`_k_smallest`) instead of `argpartition` over whole rows.

The result is `KNNClassifier`'s: nearest first, equal distances by training index (tested equal
on data with exact ties). The distances round differently in the last bits, which only matters
where two distances lie within a few ulps at the k-th place.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from modules.classics.knn import KNNClassifier, KNNConfig


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
class FastKNNConfig(KNNConfig):
    """:class:`KNNConfig` plus how the search is laid out.

    Args:
        block_size: Query rows per distance block; memory per block is
            block_size * n_train * 9 bytes per worker (the float64 distances and the boolean
            candidate mask), plus the candidates (a few per row) and, per call, the
            (n_query, d + 2) query matrix.
        n_jobs: Worker threads, each taking a contiguous share of the queries with a
            one-thread BLAS. None: one worker per usable CPU when the distance product is large
            (>= 1e8 multiply-adds), else a single thread whose matrix product BLAS parallelises.
    """

    block_size: int = 512
    n_jobs: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
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


def _k_smallest(D: np.ndarray, k: int, group: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest entries of each row of D, nearest first, equal distances by column index.

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
        index, as `modules.classics.knn.nearest_k`; their values (b, k)).
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
    return cols[sel], vals[sel]


class FastKNNClassifier(KNNClassifier):
    """:class:`KNNClassifier` with the blocked, threaded search above.

    Args:
        config: k, weighting, block size and workers.
    """

    def __init__(self, config: FastKNNConfig) -> None:
        super().__init__(config)
        self.train_side: np.ndarray | None = None  # [X, 1, ||x||^2], the stored training set
        self.block_bytes = 0  # bytes of the largest distance blocks and masks, for the memory ledger

    def fit(self, X: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> "FastKNNClassifier":
        super().fit(X, y, classes)
        self.train_side = _train_side(self.X, _sqnorm(self.X, "the training set X"))
        self.X = self.train_side[:, :-2]  # a view: the training set is held once
        if self.config.n_jobs != 1:
            _controller()  # one-off library scan (~10 ms) belongs to fitting, not to predict
        return self

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances and indices of the k nearest training points, nearest first.

        Returns:
            (dist (n, k), ind (n, k)); dist is Euclidean (not squared).
        """
        X = self._check_query(X)
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
        self.block_bytes = max(self.block_bytes, sum(stats))
        return dist, ind

    def _kneighbors_part(self, Q: np.ndarray, dist: np.ndarray, ind: np.ndarray) -> tuple[int, int]:
        """kneighbors for one worker's query rows Q ([-2x, ||x||^2, 1]), written into dist/ind;
        returns the bytes of its block buffers."""
        k, bs, n = self.config.k, self.config.block_size, Q.shape[0]
        # one buffer for every block: fresh multi-MB temporaries cost more in page faults
        # than the arithmetic on them
        buf = np.empty((min(bs, n), self.X.shape[0]))
        for s in range(0, n, bs):
            D = np.matmul(Q[s : s + bs], self.train_side.T, out=buf[: min(bs, n - s)])  # (b, n_train)
            ind[s : s + bs], d = _k_smallest(D, k)
            dist[s : s + bs] = np.sqrt(d)
        return buf.nbytes + buf.size  # + the boolean candidate mask of a block

    def class_scores(self, X: np.ndarray) -> np.ndarray:
        if self.config.weights != "uniform":
            return super().class_scores(X)
        # integer vote counts are exact in any order: one bincount over (row, class) cells
        _, ind = self.kneighbors(X)
        labels, K = self.y[ind], len(self.classes_)
        cells = labels + K * np.arange(len(labels))[:, None]
        return np.bincount(cells.ravel(), minlength=len(labels) * K).reshape(-1, K).astype(float)
