"""Regularized logistic regression in NumPy: forward, loss, hand-derived gradient, GD steps.

No torch and no autograd here: the gradient below is derived by hand and checked against
central finite differences in the tests.

Notation: X (n, d) inputs, y (n,) integer labels in [0, K), W (d, C) weights, b (C,) bias,
Z = X W + b (n, C) logits. Binary problems (K = 2) use one logit column (C = 1) and the
sigmoid, like scikit-learn; K > 2 uses C = K columns and the softmax (the full,
over-parameterised multinomial model that scikit-learn's lbfgs solver also fits).

Objective (the bias is never penalised):

    J(W, b) = (1/n) sum_i l_i(W, b) + R(W),   R = (lam/2) ||W||_F^2  (L2)  or  lam ||W||_1  (L1)

Gradient derivation.

* Multinomial: p_i = softmax(z_i), l_i = -log p_{i,y_i} = logsumexp(z_i) - z_{i,y_i}.
  d logsumexp(z)/dz_c = exp(z_c) / sum_j exp(z_j) = p_c and d z_{y}/dz_c = [c = y], so
  dl_i/dz_i = p_i - e_{y_i} (e the one-hot row). Stacking rows, dL/dZ = (P - Y) / n.
* Binary: p_i = sigmoid(z_i), l_i = -y_i log p_i - (1 - y_i) log(1 - p_i). With
  log p = -softplus(-z) and log(1 - p) = -softplus(z), l_i = softplus(z_i) - y_i z_i, and
  softplus'(z) = sigmoid(z), so dl_i/dz_i = p_i - y_i: the same form, dL/dZ = (p - y) / n.
* Chain rule through Z = X W + 1 b^T: dZ/dW contracts over the sample axis, so
  dL/dW = X^T dL/dZ  (d, C) and dL/db = 1^T dL/dZ = column sums  (C,).
* L2: d/dW (lam/2)||W||^2 = lam W, added to dL/dW.
* L1 is not differentiable at 0, so it is handled by the proximal operator of t lam ||.||_1
  (soft-thresholding): W <- sign(V) max(|V| - t lam, 0) with V = W - t dL/dW (ISTA, one
  proximal-gradient step). b takes the plain gradient step.

Numerical stability: logsumexp subtracts the row maximum before exponentiating, the binary
loss uses logaddexp(0, z) for softplus, and probabilities come from exp(log-probabilities),
so no exp overflows and no log(0) appears for any finite logit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

PENALTIES = ("l2", "l1", "none")


class ConvergenceWarning(UserWarning):
    """`LogisticRegression.fit` reached max_iter before its stopping rule held (scikit-learn's
    warning of the same name, without importing scikit-learn into the core)."""


@dataclass
class LogRegConfig:
    """Shape and training hyper-parameters of :class:`LogisticRegression`.

    Args:
        n_features: Input dimension d.
        n_classes: Number of classes K (>= 2); K = 2 gives the sigmoid model.
        penalty: "l2", "l1" or "none".
        lam: Penalty strength lambda (>= 0) in the objective above. scikit-learn's
            equivalent is C = 1 / (lam * n_train).
        lr: Gradient-descent step size (> 0).
    """

    n_features: int
    n_classes: int
    penalty: str = "l2"
    lam: float = 1e-3
    lr: float = 0.1

    def __post_init__(self) -> None:
        if int(self.n_features) < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if int(self.n_classes) < 2:
            raise ValueError(f"n_classes must be >= 2 (a classifier needs two classes), got {self.n_classes}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lam (penalty strength) must be a finite number >= 0, got {self.lam}")
        if not np.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr (learning rate) must be a finite number > 0, got {self.lr}")


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(z))) along `axis`, shifted by the maximum so nothing overflows."""
    m = np.max(z, axis=axis, keepdims=True)
    # A row of -inf would give nan from (-inf) - (-inf); no finite logit produces it.
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(z - m), axis=axis))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of logits (n, K)."""
    return z - logsumexp(z, axis=1)[:, None]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """exp(-softplus(-z)): stable for large |z| in both directions."""
    return np.exp(-np.logaddexp(0.0, -z))


def soft_threshold(v: np.ndarray, t: float) -> np.ndarray:
    """Proximal operator of t * ||.||_1: shrink every entry towards 0 by t."""
    return np.sign(v) * np.maximum(np.abs(v) - t, 0.0)


class LogisticRegression:
    """Binary (sigmoid) or multinomial (softmax) logistic regression.

    Two ways to train: `fit` solves the problem to a tolerance (accelerated full-batch proximal
    gradient, no step size to tune); `step` / `fit_minibatch` take plain (mini-batch) gradient
    steps at `config.lr`, the textbook loop.

    Parameters start at zero: the objective is convex, so the start only changes the path.

    Args:
        config: Sizes, penalty and step size.
    """

    def __init__(self, config: LogRegConfig) -> None:
        self.config = config
        self.binary = config.n_classes == 2
        n_out = 1 if self.binary else config.n_classes
        self.W = np.zeros((config.n_features, n_out))  # (d, C)
        self.b = np.zeros(n_out)  # (C,)
        # Last gradients and the bytes the last step kept from forward for backward,
        # for the memory ledger.
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)
        self.activation_bytes = 0
        self.n_iter_ = 0  # iterations of the last `fit`

    # ----- forward -------------------------------------------------------------------
    def _check(self, X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.config.n_features:
            raise ValueError(f"X must have shape (n, {self.config.n_features}), got {X.shape}")
        if y is not None:
            y = np.asarray(y)
            if y.shape != (X.shape[0],):
                raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= self.config.n_classes):
                raise ValueError(
                    f"labels must be integers in [0, {self.config.n_classes}), got range [{y.min()}, {y.max()}]"
                )
            y = y.astype(np.intp)
        return X, y

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Z = X W + b, shape (n, C)."""
        X, _ = self._check(X)
        return X @ self.W + self.b

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        """Log-probabilities of all K classes, (n, K)."""
        z = self.logits(X)
        if self.binary:
            # log p(y=1) = -softplus(-z), log p(y=0) = -softplus(z)
            return np.concatenate([-np.logaddexp(0.0, z), -np.logaddexp(0.0, -z)], axis=1)
        return log_softmax(z)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.log_proba(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(X)
        if self.binary:
            return (z[:, 0] > 0).astype(np.intp)
        return np.argmax(z, axis=1)

    # ----- loss and gradient ---------------------------------------------------------
    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy (the data term, without the penalty)."""
        X, y = self._check(X, y)
        z = X @ self.W + self.b
        if self.binary:
            z = z[:, 0]
            return float(np.mean(np.logaddexp(0.0, z) - y * z))
        return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))

    def penalty_value(self) -> float:
        lam = self.config.lam
        if self.config.penalty == "l2":
            return 0.5 * lam * float(np.sum(self.W * self.W))
        if self.config.penalty == "l1":
            return lam * float(np.sum(np.abs(self.W)))
        return 0.0

    def objective(self, X: np.ndarray, y: np.ndarray) -> float:
        """Data term plus penalty: the J(W, b) of the module docstring."""
        return self.loss(X, y) + self.penalty_value()

    def gradient(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Gradient of the smooth part of J (data term, plus L2 when penalty == "l2").

        Returns:
            (dW (d, C), db (C,), mean cross-entropy of the batch before the step).
        """
        X, y = self._check(X, y)
        n = X.shape[0]
        if n == 0:
            raise ValueError("cannot take a gradient on an empty batch")
        z = X @ self.W + self.b  # (n, C)
        if self.binary:
            zc = z[:, 0]
            loss = float(np.mean(np.logaddexp(0.0, zc) - y * zc))
            dz = (sigmoid(zc) - y)[:, None] / n  # (n, 1) = (p - y) / n
        else:
            logp = log_softmax(z)  # (n, K)
            loss = float(-np.mean(logp[np.arange(n), y]))
            dz = np.exp(logp)  # P
            dz[np.arange(n), y] -= 1.0  # P - Y
            dz /= n
        # dz is what backward needs from forward: the activation memory of one step.
        self.activation_bytes = dz.nbytes
        dW = X.T @ dz  # (d, C)
        db = dz.sum(axis=0)  # (C,)
        if self.config.penalty == "l2":
            dW = dW + self.config.lam * self.W
        return dW, db, loss

    def step(self, X: np.ndarray, y: np.ndarray) -> float:
        """One (proximal) gradient step on the batch; returns the batch loss before the step."""
        dW, db, loss = self.gradient(X, y)
        lr = self.config.lr
        self.W = self.W - lr * dW
        if self.config.penalty == "l1":
            self.W = soft_threshold(self.W, lr * self.config.lam)
        self.b = self.b - lr * db
        self.dW, self.db = dW, db
        return loss

    def fit(self, X: np.ndarray, y: np.ndarray, tol: float = 1e-6, max_iter: int = 10_000) -> int:
        """Minimise J on the whole of (X, y) until the stopping rule holds; returns the iterations run.

        Accelerated proximal gradient (FISTA, Beck & Teboulle 2009) with step 1/L, where L bounds
        the curvature of the smooth part of J: the Hessian of the mean cross-entropy is at most
        c X~^T X~ / n with X~ = [X, 1] and c = 1/4 (sigmoid) or 1/2 (softmax, Boehning's bound),
        plus lam for L2. So no learning rate is tuned per data set. Momentum restarts whenever
        it points uphill (O'Donoghue & Candes 2015, gradient scheme), which keeps the fast rate
        on strongly convex problems.

        Stopping rule, as scikit-learn's `tol` for lbfgs (its `gtol`): the largest entry of the
        gradient mapping G = (theta - prox(theta - grad / L)) * L is <= tol. Without L1, G is
        the gradient of J itself; with L1 it is zero exactly at the optimum too. For L2 a
        gradient of size g bounds the gap to the optimum by ||g||^2 / (2 lam).

        Args:
            X: Inputs (n, d).
            y: Labels (n,).
            tol: Stopping tolerance on max |G| (> 0).
            max_iter: Iterations at most; reaching it warns with `ConvergenceWarning`.
        """
        X, y = self._check(X, y)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        n = X.shape[0]
        Xb = np.hstack([X, np.ones((n, 1))])
        c = 0.25 if self.binary else 0.5
        L = c * float(np.linalg.eigvalsh(Xb.T @ Xb / n)[-1]) + (self.config.lam if self.config.penalty == "l2" else 0.0)
        theta = (self.W.copy(), self.b.copy())  # the iterate
        z, t = theta, 1.0  # the extrapolated point and the momentum counter
        for it in range(1, max_iter + 1):
            self.W, self.b = z
            dW, db, _ = self.gradient(X, y)
            self.dW, self.db = dW, db
            W = z[0] - dW / L
            if self.config.penalty == "l1":
                W = soft_threshold(W, self.config.lam / L)
            new = (W, z[1] - db / L)
            g_max = max(np.max(np.abs(z[0] - new[0])), np.max(np.abs(z[1] - new[1]))) * L  # max |G(z)|
            if g_max <= tol:
                theta = new
                break
            # momentum: restart when the last step and the momentum disagree
            uphill = np.sum((z[0] - new[0]) * (new[0] - theta[0])) + np.sum((z[1] - new[1]) * (new[1] - theta[1]))
            t_next = 1.0 if uphill > 0 else (1 + np.sqrt(1 + 4 * t * t)) / 2
            beta = 0.0 if uphill > 0 else (t - 1) / t_next
            z = (new[0] + beta * (new[0] - theta[0]), new[1] + beta * (new[1] - theta[1]))
            theta, t = new, t_next
        else:
            warnings.warn(f"logistic regression stopped at max_iter={max_iter} with max |gradient| {g_max:.2e} > "
                          f"tol={tol:g}: raise max_iter, or loosen tol", ConvergenceWarning, stacklevel=2)
        self.W, self.b = theta
        self.n_iter_ = it
        return it

    def fit_minibatch(
        self, X: np.ndarray, y: np.ndarray, epochs: int = 100, batch_size: int | None = None, seed: int = 0
    ) -> list[float]:
        """Plain mini-batch GD at the config's `lr` for a fixed number of epochs (the Lightning
        module's "sgd" solver drives `step` itself the same way).

        Args:
            X: Inputs (n, d).
            y: Labels (n,).
            epochs: Passes over the data.
            batch_size: Rows per step; None means full-batch gradient descent.
            seed: Seed of the per-epoch shuffle.

        Returns:
            The batch losses, one per step.
        """
        X, y = self._check(X, y)
        n = X.shape[0]
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {batch_size}")
        bs = n if batch_size is None else batch_size
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(epochs):
            order = rng.permutation(n) if bs < n else np.arange(n)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                losses.append(self.step(X[idx], y[idx]))
        return losses

    def param_count(self) -> int:
        return int(self.W.size + self.b.size)
