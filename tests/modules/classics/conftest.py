"""The classics' test oracle: scikit-learn's k-NN heap, replayed, to say which neighbours it keeps among ties."""

import numpy as np
import pytest

_DBL_MAX = np.finfo(np.float64).max


def replay_sklearn_heap(D: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's `heap_push` max-heap, replayed over the columns of D in index order.

    scikit-learn (1.3+, brute force, dense float64) keeps, per query, a fixed-size max-heap of k
    (distance, index) pairs and pushes the training points in index order
    (`sklearn/utils/_heap.pyx::heap_push`): a point whose distance is >= the heap's maximum is
    rejected, and a point that enters sifts down only past strictly larger children (ties going
    left). When more than k points share the k-th smallest distance, which survive depends on
    that history, not simply on the lowest indices. This replays it exactly: an oracle of
    scikit-learn's choice among tied points, for the tests.

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


@pytest.fixture
def sklearn_heap():
    """`replay_sklearn_heap(D, k) -> (m, k) indices`: the neighbours scikit-learn keeps for each row of D."""
    return replay_sklearn_heap
