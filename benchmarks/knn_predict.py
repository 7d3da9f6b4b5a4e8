"""NumPy k-NN predict time (modules/classics/knn_fast.py) against scikit-learn's brute-force KNeighborsClassifier, one process.

Run from the repository root (by hand, not part of the tests):

    .venv/bin/python benchmarks/knn_predict.py [--repeats 15] [--k 5]

Both sides predict the test split of the same TabularDataModule split (digits: 1,078 train /
360 test, 64 features; mnist5k: 3,000 train / 1,000 test, 784 features), from the same fitted
float64 arrays. Timings are the minimum over `repeats` runs, the two sides alternating in blocks of five
calls after a short pause, so drifting load on a shared machine hits both sides alike. Predictions are checked to
be identical before anything is timed. Two thread settings are measured: the defaults (for the
NumPy side one worker thread per CPU, each with a one-thread BLAS, on large searches such as
mnist5k, and one thread with BLAS's own threads on small ones such as digits; OpenMP threads
for scikit-learn's Cython) and everything on one thread. On a machine shared with other busy
processes the default (multi-threaded) numbers mostly measure how fast idle threads get a
core back, so the one-thread line is the like-for-like comparison there; the load average
is printed. ratio = ours / scikit-learn: below 1 means the NumPy version is faster.

Some machines set OPENBLAS_CORETYPE (and OPENBLAS_L2_SIZE) to work around old OpenBLAS bugs,
which slows a current NumPy's matrix products; to measure without them, unset both for this
command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/knn_predict.py

The BLAS kernel in use is printed so a reader can tell which case was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_info, threadpool_limits

from datamodules.tabular import TabularDataModule
from modules.classics.knn_fast import FastKNNClassifier, FastKNNConfig


def best_of(fns: dict[str, callable], repeats: int, block: int = 5, pause_s: float = 0.3) -> dict[str, float]:
    """Minimum per-call time, the sides alternating in blocks of `block` calls, a pause before each.

    scikit-learn's OpenMP threads keep spinning for a while after each call (OMP_WAIT_POLICY
    active); a call of ours placed right after one is timed against those spinning threads. The
    pause lets them go idle, so each side is timed on a quiet machine (with OMP_WAIT_POLICY=PASSIVE
    per-call interleaving shows the same picture).
    """
    times = {name: float("inf") for name in fns}
    for _ in range(max(1, repeats // block)):
        for name, fn in fns.items():
            time.sleep(pause_s)
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[name] = min(times[name], time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    args = ap.parse_args()

    env = {v: os.environ.get(v, "<unset>") for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    blas = [f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
            for i in threadpool_info() if i["user_api"] == "blas"]
    omp = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"]
    print(f"env: {env}; BLAS: {blas}; OpenMP threads: {omp}; CPUs: {os.cpu_count()}; "
          f"load average: {os.getloadavg()}")
    print(f"{'dataset':<9} {'weights':<9} {'threads':<8} {'numpy_s':>9} {'sklearn_s':>10} {'ratio':>7}")
    worst = 0.0
    for name in args.datasets:
        dm = TabularDataModule(name, seed=0)
        dm.setup()
        (Xtr, ytr), (Xte, _) = dm.splits["train"], dm.splits["test"]
        for weights in ("uniform", "distance"):
            theirs = KNeighborsClassifier(n_neighbors=args.k, weights=weights, algorithm="brute").fit(Xtr, ytr)
            for threads in ("default", "1"):
                # default: one worker thread per CPU (n_jobs=None); "1": n_jobs=1 and every
                # thread pool (BLAS, OpenMP) limited to one thread
                ours = FastKNNClassifier(FastKNNConfig(k=args.k, weights=weights, n_jobs=1 if threads == "1" else None))
                ours.fit(Xtr, ytr)
                if not np.array_equal(ours.predict(Xte), theirs.predict(Xte)):
                    raise SystemExit(f"{name}/{weights}: predictions differ from scikit-learn's")
                limit = threadpool_limits(1) if threads == "1" else contextlib.nullcontext()
                with limit:
                    t = best_of({"numpy": lambda: ours.predict(Xte), "sklearn": lambda: theirs.predict(Xte)},
                                args.repeats)
                ratio = t["numpy"] / t["sklearn"]
                worst = max(worst, ratio)
                print(f"{name:<9} {weights:<9} {threads:<8} {t['numpy']:>9.4f} {t['sklearn']:>10.4f} {ratio:>7.2f}")
    print(f"worst ratio numpy/sklearn: {worst:.2f} ({'no slower' if worst <= 1 else 'SLOWER'} than scikit-learn)")


if __name__ == "__main__":
    main()
