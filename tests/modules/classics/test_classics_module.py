"""The classics' Lightning modules: through the real pipeline into MLflow, checkpoints, bad input."""

from pathlib import Path

import numpy as np
import torch
import pytest
from mlflow import MlflowClient
from sklearn.neighbors import KNeighborsClassifier

from datamodules.tabular import TabularDataModule
from modules.classics.module import KNNModule, LogisticRegressionModule, SklearnModule
from pipelines.run import run_experiment
from tests.helpers import quiet_trainer

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "classics"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]



def test_logreg_through_the_pipeline(tracking_uri):
    res = run_experiment(CONFIGS / "logreg_breast_cancer.yaml",
                         ["--trainer.max_epochs=4", "--trainer.check_val_every_n_epoch=2", *QUIET], tracking_uri)
    assert res.status == "FINISHED", res.error
    client = MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    assert t["practicum.project"] == "classics"
    dm = TabularDataModule("breast_cancer", batch_size=64, seed=0)
    assert p["data.fingerprint"] == dm.fingerprint()
    for key in ("train/loss", "val/loss", "val/acc", "test/acc", "test/loss", "perf/fit_time_s", "perf/predict_time_s"):
        assert key in m, key
    assert m["val/acc"] > 0.9 and m["test/acc"] > 0.9 and m["perf/fit_time_s"] > 0 and m["perf/predict_time_s"] > 0
    # binary model: W (30, 1) and b (1,), float64; gradients the same; plain GD has no state
    assert m["params/total"] == 31 and m["mem/params_bytes"] == m["mem/grads_bytes"] == 31 * 8
    assert m["mem/optimizer_bytes"] == 0
    n_train = len(dm.splits["train"][1])
    assert m["mem/activations_bytes"] == 8 * (n_train % 64 or 64)  # (p - y) of the last batch
    steps = [h.step for h in client.get_metric_history(res.run_id, "train/loss")]
    assert len(steps) >= 3 and max(steps) <= 4 * int(np.ceil(n_train / 64))  # NumPy steps are counted


def test_knn_and_sklearn_knn_agree_through_the_pipeline(tracking_uri):
    """Same split, same k: identical predictions, so identical accuracies (also after the
    pipeline reloads each module from its best checkpoint for the test)."""
    ours = run_experiment(CONFIGS / "knn_digits.yaml", ["--model.init_args.n_jobs=1", *QUIET], tracking_uri)
    theirs = run_experiment(CONFIGS / "sklearn_knn_digits.yaml", QUIET, tracking_uri)
    assert ours.status == theirs.status == "FINISHED", (ours.error, theirs.error)
    dm = TabularDataModule("digits", batch_size=None, seed=0)
    dm.setup()
    (Xtr, ytr), (Xte, yte) = dm.splits["train"], dm.splits["test"]
    expected = np.mean(KNeighborsClassifier(5, algorithm="brute").fit(Xtr, ytr).predict(Xte) == yte)
    assert ours.metrics["test/acc"] == theirs.metrics["test/acc"] == pytest.approx(expected, abs=1e-6)
    assert ours.metrics["val/acc"] == theirs.metrics["val/acc"]
    m = MlflowClient(tracking_uri).get_run(ours.run_id).data.metrics
    # the training set is held with two more columns (1 and ||x||^2) that carry the norms into
    # the distance product
    assert m["mem/params_bytes"] == Xtr.nbytes + 2 * 8 * len(Xtr) + ytr.nbytes
    assert m["params/total"] == Xtr.size + ytr.size
    # read at the end of fit: one worker, one block of the validation split x the training rows,
    # float64 distances plus the boolean candidate mask
    assert m["mem/activations_bytes"] == len(dm.splits["val"][1]) * len(ytr) * (8 + 1)
    assert "val/loss" not in m and m["perf/predict_time_s"] > 0


def test_pipeline_rejects_k_larger_than_the_training_set(tracking_uri):
    res = run_experiment(CONFIGS / "knn_digits.yaml", ["--model.init_args.k=5000", *QUIET], tracking_uri)
    assert res.status == "FAILED" and "k=5000 exceeds the training set size 1078" in res.error


@pytest.mark.parametrize("module", [
    lambda: LogisticRegressionModule(penalty="l1", lam=1e-3, lr=0.5),
    lambda: KNNModule(k=3, weights="distance"),
    lambda: SklearnModule("sklearn.linear_model.LogisticRegression", {"max_iter": 500}, equivalent_lam=1e-2),
    lambda: SklearnModule("lightgbm.LGBMClassifier", {"n_estimators": 5, "verbose": -1}),
    lambda: SklearnModule("xgboost.XGBClassifier", {"n_estimators": 5}),
    lambda: SklearnModule("sklearn.ensemble.RandomForestClassifier", {"n_estimators": 5}),
])
def test_checkpoint_round_trip_predicts_the_same(module, tmp_path):
    dm = TabularDataModule("iris", batch_size=32)
    model = module()
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(model, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    X = dm.splits["test"][0]
    loaded = type(model).load_from_checkpoint(path, weights_only=True)
    np.testing.assert_array_equal(loaded._predict(X)[0], model._predict(X)[0])
    assert loaded.param_count() == model.param_count()
    assert loaded.memory_ledger()["params_bytes"] == model.memory_ledger()["params_bytes"] > 0


class Payload:
    """Stands in for any non-scikit-learn object a crafted checkpoint could carry."""


@pytest.mark.parametrize("state, match", [
    (lambda: {"estimator_pickle": __import__("pickle").dumps(Payload())}, "pickle.*refused"),
    (lambda: {"estimator_skops": __import__("skops.io").io.dumps(Payload())}, "outside scikit-learn.*Payload"),
])
def test_sklearn_checkpoint_with_foreign_objects_is_refused(state, match, tmp_path):
    dm = TabularDataModule("iris", batch_size=None)
    model = SklearnModule("sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 3}, log_loss=False)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    SklearnModule.load_from_checkpoint(path, weights_only=True)  # the honest file (a KD-tree inside) loads
    ckpt["classics"] = state()
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=match):
        SklearnModule.load_from_checkpoint(path, weights_only=True)


LOAD_BACK = """
import sys, numpy as np, mlflow, mlflow.lightgbm
from datamodules.tabular import TabularDataModule
mlflow.set_tracking_uri(sys.argv[1])
dm = TabularDataModule("breast_cancer", batch_size=None, seed=0)
dm.setup()
X = dm.splits["test"][0]
native = mlflow.lightgbm.load_model(sys.argv[2])
print(type(native).__module__ + "." + type(native).__name__)
print(",".join(map(str, native.predict(X))))
print(",".join(map(str, np.asarray(mlflow.pyfunc.load_model(sys.argv[2]).predict(X)).ravel())))
"""


@pytest.mark.slow  # logs an MLflow Model and starts a fresh Python: ~15 s alone, more on a busy machine
def test_a_tree_model_is_logged_in_its_flavour_and_loads_in_a_fresh_process(tracking_uri):
    import subprocess
    import sys

    from tests.helpers import ROOT

    res = run_experiment(ROOT / "configs" / "tabular" / "lightgbm.yaml",
                         ["--log_model=true", "--model.init_args.estimator_kwargs.n_estimators=20", *QUIET], tracking_uri)
    assert res.status == "FINISHED", res.error
    tags = MlflowClient(tracking_uri).get_run(res.run_id).data.tags
    assert tags["practicum.model_flavour"] == "lightgbm" and "practicum.model_error" not in tags
    dm = TabularDataModule("breast_cancer", batch_size=None, seed=0)
    dm.setup()
    (Xtr, ytr), (Xte, yte) = dm.splits["train"], dm.splits["test"]
    out = subprocess.run([sys.executable, "-c", LOAD_BACK, tracking_uri, f"runs:/{res.run_id}/model"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    cls, native, served = out.stdout.strip().splitlines()[-3:]
    assert cls == "lightgbm.sklearn.LGBMClassifier"
    native = np.array(native.split(","), dtype=int)
    np.testing.assert_array_equal(native, np.array(served.split(","), dtype=float).astype(int))
    assert np.mean(native == yte) == pytest.approx(res.metrics["test/acc"], abs=1e-6)  # the run's own model (float32 metric)


def test_converge_solver_fits_the_whole_split_once_to_tolerance():
    """solver="converge" in the module gives the core's own `fit` on the training split, whatever the batches."""
    from modules.classics.logreg import LogisticRegression, LogRegConfig

    dm = TabularDataModule("wine", batch_size=32)
    model = LogisticRegressionModule(solver="converge", lam=1e-3, tol=1e-7)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, dm)
    X, y = dm.splits["train"]
    ref = LogisticRegression(LogRegConfig(X.shape[1], 3, lam=1e-3))
    n_iter = ref.fit(X, y, tol=1e-7)
    np.testing.assert_allclose(model.core.W, ref.W, atol=1e-9)  # the batches came shuffled: sums round differently
    assert trainer.callback_metrics["classics/n_iter"] == n_iter
    assert trainer.global_step == int(np.ceil(len(y) / 32))  # one counted (no-op optimizer) step per batch
    with pytest.raises(ValueError, match="solver"):
        LogisticRegressionModule(solver="newton")


def test_sklearn_equivalent_lam_sets_c_from_the_training_size():
    dm = TabularDataModule("iris", batch_size=None)
    model = SklearnModule(equivalent_lam=0.01)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, dm)
    assert model.estimator.C == pytest.approx(1.0 / (0.01 * 90))


@pytest.mark.parametrize("make, field", [
    (lambda: LogisticRegressionModule(lr=-1.0), "lr"),
    (lambda: LogisticRegressionModule(lam=-0.1), "lam"),
    (lambda: LogisticRegressionModule(penalty="l0"), "penalty"),
    (lambda: KNNModule(k=0), "k"),
    (lambda: KNNModule(weights="gaussian"), "weights"),
    (lambda: SklearnModule("sklearn.nothing.Here"), "estimator="),
    (lambda: SklearnModule(estimator_kwargs={"bogus": 1}), "estimator_kwargs"),
    (lambda: SklearnModule("sklearn.neighbors.KNeighborsClassifier", equivalent_lam=0.1, log_loss=False), "C parameter"),
    (lambda: SklearnModule("sklearn.svm.SVC"), "log_loss"),
])
def test_bad_arguments_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_logreg_without_sizes_or_datamodule_says_what_to_set():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
                      batch_size=2)
    with pytest.raises(ValueError, match="n_features"):
        quiet_trainer(max_epochs=1).fit(LogisticRegressionModule(), data)
