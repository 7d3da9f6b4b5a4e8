"""Thin LightningModules around the NumPy cores and around scikit-learn-API estimators, for one pipeline.

None of these modules owns a torch parameter. Lightning runs them under manual optimization
with `configure_optimizers` returning None, which gives Lightning's no-op stand-in optimizer;
each training batch's NumPy work runs as that optimizer's step closure (`_counted_step`), so
`trainer.global_step`, `max_steps` and step-based logging count NumPy steps like any other step.

Timing keys: `perf/fit_time_s` is the wall time spent fitting (all gradient steps, or storing
the training set, or the estimator's `fit`), logged here; `perf/predict_time_s`, the time to
predict the validation split at the last validation, is measured for every project by the
pipeline's resource callback around the validation batches, one prediction per batch.
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Callable

import lightning as L
import numpy as np
import torch

from contract import MemoryLedger, ParamCount, ServesEstimator
from modules.classics.knn_fast import FastKNNClassifier, FastKNNConfig
from modules.classics.logreg import LogisticRegression, LogRegConfig

_EPS = np.finfo(np.float64).eps


def _train_size(trainer: L.Trainer | None) -> int | None:
    """Rows in the datamodule's training split, when it can tell without training."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is None:
        return None
    try:
        return len(dm.train_dataloader().dataset)
    except Exception:  # a datamodule without a sized training set: check at fit time instead
        return None


class _NumpyClassifierModule(L.LightningModule):
    """What the classics share: NumPy batches, manual steps, timed and scored evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.fit_time_s = 0.0
        # fit-once models (KNN, scikit-learn) collect the training split here, then fit
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def configure_optimizers(self) -> None:
        return None  # no torch parameters: Lightning substitutes a no-op optimizer

    @staticmethod
    def _numpy(batch: Any) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch
        to_np = (lambda t: t.numpy(force=True)) if isinstance(x, torch.Tensor) else np.asarray
        return to_np(x), to_np(y)

    def _counted_step(self, fn: Callable[[], Any]) -> Any:
        """Run `fn`, the batch's NumPy work, as the closure of Lightning's optimizer step.

        With `configure_optimizers` returning None, `self.optimizers()` is Lightning's no-op
        `_MockOptimizer`: its `step(closure)` only calls the closure. Calling it anyway is what
        makes Lightning count the batch as an optimizer step (`global_step`, `max_steps`,
        step-based logging and checkpoints); the NumPy update itself happens inside `fn`.
        """
        out: dict[str, Any] = {}

        def closure() -> None:
            out["value"] = fn()

        self.optimizers().step(closure=closure)  # the no-op optimizer: runs closure(), nothing else
        return out.get("value")

    # ----- hooks the subclasses fill -------------------------------------------------
    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    def _fit_pending(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Predicted labels (n,) and log-probabilities (n, K), or None when not meaningful."""
        raise NotImplementedError

    # ----- fit-once plumbing ---------------------------------------------------------
    def _collect(self, batch: Any) -> None:
        X, y = self._numpy(batch)
        t = time.perf_counter()
        self._counted_step(lambda: self._pending.append((X.copy(), y.copy())))
        self.fit_time_s += time.perf_counter() - t

    def _finish_fit(self) -> None:
        if not self._pending:
            return
        X = np.concatenate([p[0] for p in self._pending])
        y = np.concatenate([p[1] for p in self._pending])
        self._pending = []
        t = time.perf_counter()
        self._fit_pending(X, y)
        self.fit_time_s += time.perf_counter() - t

    # ----- evaluation ----------------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> None:
        if not self.fitted:
            return  # the sanity check runs before a fit-once model has seen data
        X, y = self._numpy(batch)
        pred, logp = self._predict(X)
        n = len(y)
        self.log(f"{stage}/acc", float(np.mean(pred == y)), on_epoch=True, batch_size=n, sync_dist=True)
        if logp is not None:
            loss = float(-np.mean(logp[np.arange(n), y]))
            self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=n, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._pending = []

    def on_validation_epoch_start(self) -> None:
        self._finish_fit()  # Lightning validates before on_train_epoch_end

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_train_epoch_end(self) -> None:
        self._finish_fit()
        self.log("perf/fit_time_s", self.fit_time_s)

    def on_test_epoch_start(self) -> None:
        self._finish_fit()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} was tested before it was fitted: run fit first")
        self._evaluate(batch, "test")


class LogisticRegressionModule(_NumpyClassifierModule, MemoryLedger, ParamCount):
    """NumPy logistic regression, trained one of two ways (`solver`).

    "sgd": one hand-derived gradient step at `lr` per training batch, for as many epochs as the
    trainer runs (the textbook loop; its curve is `train/loss` per step).
    "converge": fit once on the whole training split, as scikit-learn does: accelerated
    proximal gradient until the largest gradient entry is <= `tol`, at most `max_iter`
    iterations (`LogisticRegression.fit`; no step size to tune). Run it for one epoch.

    Args:
        penalty: "l2", "l1" (proximal step) or "none".
        lam: Penalty strength lambda; scikit-learn's equivalent is C = 1 / (lam * n_train).
        lr: Gradient-descent step size of the "sgd" solver.
        solver: "sgd" or "converge".
        tol: Stopping tolerance of the "converge" solver (max |gradient|, scikit-learn's `tol`).
        max_iter: Iteration cap of the "converge" solver; reaching it warns (ConvergenceWarning).
        n_features: Input dimension; None reads `num_features` from the datamodule.
        n_classes: Number of classes; None reads `num_classes` from the datamodule.
    """

    def __init__(
        self,
        penalty: str = "l2",
        lam: float = 1e-3,
        lr: float = 0.1,
        solver: str = "sgd",
        tol: float = 1e-6,
        max_iter: int = 10_000,
        n_features: int | None = None,
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # validate the hyper-parameters now; the sizes may only be known from the data
        LogRegConfig(n_features=n_features or 1, n_classes=n_classes or 2, penalty=penalty, lam=lam, lr=lr)
        if solver not in ("sgd", "converge"):
            raise ValueError(f"solver must be 'sgd' (a step per batch) or 'converge' (fit to tol), got {solver!r}")
        if not tol > 0 or max_iter < 1:
            raise ValueError(f"tol must be > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
        self.core: LogisticRegression | None = None
        self._converged = False

    def setup(self, stage: str) -> None:
        if self.core is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        d = self.hparams.n_features or getattr(dm, "num_features", None)
        k = self.hparams.n_classes or getattr(dm, "num_classes", None)
        if d is None or k is None:
            raise ValueError(
                "n_features and n_classes are unknown: set model.init_args.n_features/n_classes "
                "or use a datamodule with num_features/num_classes (e.g. TabularDataModule)"
            )
        h = self.hparams
        self.core = LogisticRegression(LogRegConfig(d, k, h.penalty, h.lam, h.lr))

    @property
    def fitted(self) -> bool:
        return self.core is not None and (self.hparams.solver == "sgd" or self._converged)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.solver == "converge":
            self._collect(batch)
            return
        X, y = self._numpy(batch)
        t = time.perf_counter()
        loss = self._counted_step(lambda: self.core.step(X, y))
        self.fit_time_s += time.perf_counter() - t
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(y))
        self.log("classics/objective", loss + self.core.penalty_value(), on_step=True, batch_size=len(y))

    def _fit_pending(self, X: np.ndarray, y: np.ndarray) -> None:
        self.core.fit(X, y, tol=self.hparams.tol, max_iter=self.hparams.max_iter)
        self._converged = True
        self._train_objective = (self.core.loss(X, y), self.core.objective(X, y))

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("classics/weight_sparsity", float(np.mean(self.core.W == 0.0)))
        if self.hparams.solver == "converge" and self._converged:
            loss, objective = self._train_objective
            self.log_dict({"train/loss": loss, "classics/objective": objective, "classics/n_iter": self.core.n_iter_})

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logp = self.core.log_proba(X)
        return np.argmax(logp, axis=1), logp

    def param_count(self) -> int:
        return 0 if self.core is None else self.core.param_count()

    def memory_ledger(self) -> dict[str, int]:
        c = self.core
        if c is None:
            return {"params_bytes": 0, "grads_bytes": 0, "optimizer_bytes": 0, "activations_bytes": 0}
        return {
            "params_bytes": c.W.nbytes + c.b.nbytes,
            "grads_bytes": c.dW.nbytes + c.db.nbytes,
            "optimizer_bytes": 0,  # plain gradient descent keeps no state
            "activations_bytes": c.activation_bytes,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        c = self.core
        checkpoint["classics"] = {
            "n_features": c.config.n_features,
            "n_classes": c.config.n_classes,
            "W": torch.from_numpy(c.W.copy()),
            "b": torch.from_numpy(c.b.copy()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        s, h = checkpoint["classics"], self.hparams
        self.core = LogisticRegression(LogRegConfig(s["n_features"], s["n_classes"], h.penalty, h.lam, h.lr))
        self.core.W, self.core.b = s["W"].numpy().copy(), s["b"].numpy().copy()
        self._converged = True


class KNNModule(_NumpyClassifierModule, MemoryLedger, ParamCount):
    """NumPy k-NN (the fast path, `knn_fast`): the training epoch stores the training split, validation/test predict.

    Run it for one epoch (`trainer.max_epochs: 1`); a new epoch stores the split anew.

    Args:
        k: Number of neighbours.
        weights: "uniform" or "distance".
        block_size: Query rows per distance block (bounds memory to block_size * n_train floats
            per worker).
        n_jobs: Worker threads for prediction; None: one per usable CPU for large searches, else one.
    """

    def __init__(self, k: int = 5, weights: str = "uniform", block_size: int = 512, n_jobs: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.core = FastKNNClassifier(FastKNNConfig(k=k, weights=weights, block_size=block_size, n_jobs=n_jobs))
        self._n_classes: int | None = None

    def setup(self, stage: str) -> None:
        n = _train_size(self._trainer)
        if n is not None and self.hparams.k > n:
            raise ValueError(f"k={self.hparams.k} exceeds the training set size {n}: choose k <= {n}")
        self._n_classes = getattr(getattr(self._trainer, "datamodule", None), "num_classes", None)

    @property
    def fitted(self) -> bool:
        return self.core.X is not None

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def _fit_pending(self, X: np.ndarray, y: np.ndarray) -> None:
        classes = np.arange(self._n_classes) if self._n_classes else None
        self.core.fit(X, y, classes=classes)

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, None]:
        return self.core.predict(X), None  # vote shares are no calibrated probabilities

    def param_count(self) -> int:
        # k-NN's fitted state is the stored training set itself
        return 0 if self.core.X is None else int(self.core.X.size + self.core.y.size)

    def memory_ledger(self) -> dict[str, int]:
        stored = 0 if self.core.X is None else self.core.train_side.nbytes + self.core.y.nbytes
        return {"params_bytes": stored, "grads_bytes": 0, "optimizer_bytes": 0, "activations_bytes": self.core.block_bytes}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        c = self.core
        if c.X is None:
            return  # nothing stored yet
        checkpoint["classics"] = {
            "X": torch.from_numpy(np.ascontiguousarray(c.X)),
            "y": torch.from_numpy(c.classes_[c.y]),
            "classes": torch.from_numpy(c.classes_),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        s = checkpoint.get("classics")
        if s is None:
            return
        self.core.fit(s["X"].numpy(), s["y"].numpy(), classes=s["classes"].numpy())


def _import_class(path: str, field: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{field}={path!r} is not an importable class path (e.g. sklearn.linear_model.LogisticRegression)") from e
    if not isinstance(cls, type) or not hasattr(cls, "fit") or not hasattr(cls, "predict"):
        raise ValueError(f"{field}={path!r} is not an estimator class with fit and predict")
    return cls


# Packages whose classes a checkpoint's estimator may hold; skops rebuilds them from their state
# (LightGBM and XGBoost keep their boosters as model text / JSON bytes), never by unpickling.
TRUSTED_PACKAGES = ("sklearn.", "lightgbm.", "xgboost.")
TRUSTED_TYPES = ("collections.OrderedDict",)


class SklearnModule(_NumpyClassifierModule, MemoryLedger, ParamCount, ServesEstimator):
    """A scikit-learn-API classifier fitted once on the training split, scored like the others.

    Any estimator with scikit-learn's `fit`/`predict` runs here: scikit-learn's own (logistic
    regression, k-NN, SVC, random forest, HistGradientBoosting), LightGBM's `LGBMClassifier`,
    XGBoost's `XGBClassifier`. The pipeline logs the fitted estimator as an MLflow Model in its
    library's flavour (`fitted_estimator`, `pipelines.models_sklearn`).

    Args:
        estimator: Class path, e.g. "sklearn.linear_model.LogisticRegression",
            "sklearn.svm.SVC", "lightgbm.LGBMClassifier" or "xgboost.XGBClassifier".
        estimator_kwargs: Keyword arguments of the estimator.
        equivalent_lam: If set, C = 1 / (equivalent_lam * n_train) at fit time: the C that makes
            scikit-learn's objective C * sum(loss) + R(w) the same problem as the NumPy
            model's mean(loss) + lam * R(w).
        log_loss: Also log cross-entropy from predict_proba (train/loss, val/loss, test/loss);
            turn off for estimators whose probabilities are vote shares (k-NN).
    """

    def __init__(
        self,
        estimator: str = "sklearn.linear_model.LogisticRegression",
        estimator_kwargs: dict[str, Any] | None = None,
        equivalent_lam: float | None = None,
        log_loss: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        cls = _import_class(estimator, "estimator")
        try:
            self.estimator = cls(**(estimator_kwargs or {}))
        except TypeError as e:
            raise ValueError(f"estimator_kwargs do not fit {estimator}: {e}") from e
        if equivalent_lam is not None:
            if not np.isfinite(equivalent_lam) or equivalent_lam <= 0:
                raise ValueError(f"equivalent_lam must be a finite number > 0, got {equivalent_lam}")
            if "C" not in self.estimator.get_params():
                raise ValueError(f"equivalent_lam needs an estimator with a C parameter; {estimator} has none")
        if log_loss and not hasattr(self.estimator, "predict_proba"):
            raise ValueError(f"log_loss=True needs predict_proba, which {estimator} lacks: set log_loss: false")
        self._fitted = False

    def setup(self, stage: str) -> None:
        k = self.estimator.get_params().get("n_neighbors")
        n = _train_size(self._trainer)
        if k is not None and n is not None and k > n:
            raise ValueError(f"estimator_kwargs.n_neighbors={k} exceeds the training set size {n}")

    @property
    def fitted(self) -> bool:
        return self._fitted

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def _fit_pending(self, X: np.ndarray, y: np.ndarray) -> None:
        if self.hparams.equivalent_lam is not None:
            self.estimator.set_params(C=1.0 / (self.hparams.equivalent_lam * len(y)))
        self.estimator.fit(X, y)
        self._fitted = True
        if self.hparams.log_loss:
            self._train_loss = float(-np.mean(self._logp(X)[np.arange(len(y)), np.searchsorted(self.estimator.classes_, y)]))

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.hparams.log_loss and self._fitted:
            self.log("train/loss", self._train_loss)

    def _logp(self, X: np.ndarray) -> np.ndarray:
        # clipped like sklearn.metrics.log_loss so a zero probability costs -log(eps), not inf
        return np.log(np.clip(self.estimator.predict_proba(X), _EPS, 1.0))

    def _predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.hparams.log_loss:
            return self.estimator.predict(X), None
        logp = self._logp(X)
        # columns follow classes_; map back so labels absent from training cannot shift them
        return self.estimator.classes_[np.argmax(logp, axis=1)], self._full_logp(logp)

    def _full_logp(self, logp: np.ndarray) -> np.ndarray:
        classes = self.estimator.classes_
        k = int(classes.max()) + 1
        full = np.full((logp.shape[0], k), np.log(_EPS))
        full[:, classes] = logp
        return full

    def fitted_estimator(self) -> Any | None:
        """The fitted estimator, for the pipeline to log as an MLflow Model (None before fitting)."""
        return self.estimator if self._fitted else None

    def _fitted_arrays(self) -> list[np.ndarray]:
        return [v for v in vars(self.estimator).values() if isinstance(v, np.ndarray)]

    def param_count(self) -> int:
        # the estimator's own NumPy arrays (coefficients, support vectors); 0 for tree ensembles and
        # boosters, which hold their nodes in native structures: their size is mem/params_bytes
        return sum(a.size for a in self._fitted_arrays()) if self._fitted else 0

    def memory_ledger(self) -> dict[str, int]:
        # the working memory of `fit` is not observable from outside; the fitted model's size is,
        # as the bytes of its skops serialisation (trees and boosters included)
        import skops.io

        stored = len(skops.io.dumps(self.estimator)) if self._fitted else 0
        return {"params_bytes": stored, "grads_bytes": 0, "optimizer_bytes": 0, "activations_bytes": 0}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._fitted:
            import skops.io

            checkpoint["classics"] = {"estimator_skops": skops.io.dumps(self.estimator)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The fitted estimator, read with skops: never unpickled, so a crafted file cannot run code.

        skops refuses every type outside its defaults unless trusted; only the classes of
        scikit-learn, LightGBM and XGBoost are (`TRUSTED_PACKAGES`), anything else is refused by name.
        """
        state = checkpoint.get("classics")
        if state is None:
            return
        if "estimator_skops" not in state:
            raise ValueError("this checkpoint stores its scikit-learn estimator as a pickle (an older Practicum "
                             "format); it is refused because unpickling can run code. Fit the run again.")
        import skops.io

        data = state["estimator_skops"]
        untrusted = skops.io.get_untrusted_types(data=data)
        foreign = [t for t in untrusted if not t.startswith(TRUSTED_PACKAGES) and t not in TRUSTED_TYPES]
        if foreign:
            raise ValueError(f"the checkpoint's estimator holds types outside scikit-learn, LightGBM and XGBoost "
                             f"({', '.join(foreign)}); it is refused because loading them could run code")
        self.estimator = skops.io.loads(data, trusted=untrusted)
        self._fitted = True
