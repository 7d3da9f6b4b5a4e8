"""NumPy K-Means against scikit-learn's KMeans on the digits: adjusted Rand index to the labels, inertia, time.

Both sides: k = 10, k-means++ with local trials, `n_init` seedings, the same seed (the NumPy
seeding draws scikit-learn's points, tests/modules/classics/test_classics_kmeans.py), raw pixel
features (1,797 x 64). Run from the repository root, by hand:

    python benchmarks/kmeans_digits.py [--seeds 0 1 2 3 4] [--n_init 10]
"""

import argparse
import time

import numpy as np
from sklearn.cluster import KMeans as SkKMeans
from sklearn.datasets import load_digits
from sklearn.metrics import adjusted_rand_score

from modules.classics.kmeans import KMeans, KMeansConfig

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
ap.add_argument("--n_init", type=int, default=10)
args = ap.parse_args()
X, y = load_digits(return_X_y=True)
X = X.astype(np.float64)
print(f"{'seed':>4} {'ARI numpy':>10} {'ARI sklearn':>12} {'inertia numpy':>14} {'inertia sklearn':>16} {'s numpy/sklearn':>16}")
rows = []
for seed in args.seeds:
    t0 = time.perf_counter()
    ours = KMeans(KMeansConfig(10, n_init=args.n_init), seed=seed).fit(X)
    t1 = time.perf_counter()
    sk = SkKMeans(10, n_init=args.n_init, random_state=seed).fit(X)
    t2 = time.perf_counter()
    a, b = adjusted_rand_score(y, ours.labels_), adjusted_rand_score(y, sk.labels_)
    rows.append((a, b))
    print(f"{seed:4d} {a:10.4f} {b:12.4f} {ours.inertia_:14.1f} {sk.inertia_:16.1f} {t1 - t0:8.2f}/{t2 - t1:.2f}")
a, b = np.array(rows).T
print(f"mean ARI: numpy {a.mean():.4f} (sd {a.std(ddof=1) if len(a) > 1 else 0:.4f}), "
      f"sklearn {b.mean():.4f} (sd {b.std(ddof=1) if len(b) > 1 else 0:.4f})")
