"""How close full-batch gradient descent gets to scikit-learn's L2 logistic-regression optimum.

The relative objective gap (ours - sklearn) / sklearn on the training split, same problem
(C = 1 / (lam * n_train)), at the epoch budgets of tests/modules/classics/test_classics_logreg.py
and at twice and four times them.
    python benchmarks/logreg_objective_gap.py
"""

import time

import numpy as np
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

from datamodules.tabular import TabularDataModule
from modules.classics.logreg import LogisticRegression, LogRegConfig

for dataset, lam, epochs in [("digits", 1e-2, 600), ("breast_cancer", 1e-2, 400)]:
    dm = TabularDataModule(dataset, seed=0)
    dm.setup()
    (Xtr, ytr), (Xte, yte) = dm.splits["train"], dm.splits["test"]
    sk = SkLogisticRegression(C=1.0 / (lam * len(ytr)), l1_ratio=0.0, max_iter=2000, tol=1e-8).fit(Xtr, ytr)
    for e in (epochs, 2 * epochs, 4 * epochs):
        t0 = time.perf_counter()
        m = LogisticRegression(LogRegConfig(Xtr.shape[1], dm.num_classes, penalty="l2", lam=lam, lr=1.0))
        m.fit(Xtr, ytr, epochs=e)
        ref = LogisticRegression(m.config)
        ref.W, ref.b = sk.coef_.T.copy(), sk.intercept_.copy()
        ours, theirs = m.objective(Xtr, ytr), ref.objective(Xtr, ytr)
        print(f"{dataset:14s} epochs {e:5d}  relative gap {(ours - theirs) / theirs:9.2e}  test acc "
              f"{np.mean(m.predict(Xte) == yte):.4f} vs {sk.score(Xte, yte):.4f}  ({time.perf_counter() - t0:.1f} s)")
