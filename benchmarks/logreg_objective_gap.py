"""How close the NumPy logistic regression's `fit` gets to scikit-learn's L2 optimum, on every bundled set.

Same problem on both sides (C = 1 / (lam * n_train)), one lam for every data set, our default
tol (1e-6 on max |gradient|) and max_iter; scikit-learn's lbfgs at tol 1e-10. Prints the
relative objective gap (ours - sklearn) / sklearn on the training split, our iterations, the
test accuracies and both fit times.
    python benchmarks/logreg_objective_gap.py [--lams 1e-2 1e-3 1e-4]
"""

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

from datamodules.tabular import TabularDataModule
from modules.classics.logreg import LogisticRegression, LogRegConfig

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--lams", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "wine", "iris", "diabetes", "digits", "synthetic"])
args = ap.parse_args()
print(f"{'lam':>7} {'dataset':14s} {'iters':>6} {'rel gap':>10} {'test acc':>17} {'fit s ours/sk':>14}")
for lam in args.lams:
    for dataset in args.datasets:
        dm = TabularDataModule(dataset, seed=0)
        dm.setup()
        (Xtr, ytr), (Xte, yte) = dm.splits["train"], dm.splits["test"]
        t0 = time.perf_counter()
        sk = SkLogisticRegression(C=1.0 / (lam * len(ytr)), l1_ratio=0.0, max_iter=20_000, tol=1e-10).fit(Xtr, ytr)
        t_sk = time.perf_counter() - t0
        m = LogisticRegression(LogRegConfig(Xtr.shape[1], dm.num_classes, penalty="l2", lam=lam))
        t0 = time.perf_counter()
        it = m.fit(Xtr, ytr)
        t_ours = time.perf_counter() - t0
        ref = LogisticRegression(m.config)
        ref.W, ref.b = sk.coef_.T.copy(), sk.intercept_.copy()
        ours, theirs = m.objective(Xtr, ytr), ref.objective(Xtr, ytr)
        print(f"{lam:7.0e} {dataset:14s} {it:6d} {(ours - theirs) / theirs:10.2e} "
              f"{np.mean(m.predict(Xte) == yte):.4f} vs {sk.score(Xte, yte):.4f} {t_ours:6.2f}/{t_sk:.2f}")
