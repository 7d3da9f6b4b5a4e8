"""A fitted scikit-learn-API estimator as an MLflow Model in its library's own flavour.

A module that serves such an estimator (`ServesEstimator`: `SklearnModule`) is logged with the
flavour that loads it natively, not wrapped in Practicum's checkpoint pyfunc:

* LightGBM (`lightgbm.*`): ``mlflow.lightgbm``;
* XGBoost (`xgboost.*`): ``mlflow.xgboost``, the booster saved in XGBoost's own UBJSON format;
* anything else (scikit-learn's own estimators): ``mlflow.sklearn``.

LightGBM and scikit-learn are serialised with skops, never pickle: a model read back from
shared storage cannot run code. The types skops needs trusted are listed in the MLmodel file,
and only those of scikit-learn, LightGBM and XGBoost are accepted
(`modules.classics.module.TRUSTED_PACKAGES`, the same rule as the checkpoint). Every flavour
also serves ``mlflow.pyfunc.load_model(uri).predict(X)``.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

import mlflow
import numpy as np

from pipelines.models import fluent_store




def flavour_of(estimator: Any) -> str:
    """"lightgbm", "xgboost" or "sklearn": the MLflow flavour that loads `estimator` natively."""
    package = type(estimator).__module__.split(".")[0]
    return package if package in ("lightgbm", "xgboost") else "sklearn"


def trusted_types(estimator: Any) -> list[str]:
    """The types skops must be told to trust to load `estimator`; refuses any outside the allowed packages."""
    import skops.io

    from modules.classics.module import TRUSTED_PACKAGES, TRUSTED_TYPES

    types = skops.io.get_untrusted_types(data=skops.io.dumps(estimator))
    foreign = [t for t in types if not t.startswith(TRUSTED_PACKAGES) and t not in TRUSTED_TYPES]
    if foreign:
        raise ValueError(f"the estimator holds types outside scikit-learn, LightGBM and XGBoost ({', '.join(foreign)}): "
                         "it is not logged, because loading it would need them trusted")
    return types


def log_estimator(client, run_id: str, uri: str, estimator: Any, register: str | None = None,
                  example: np.ndarray | None = None, name: str = "model") -> str:
    """Log `estimator` as the run's MLflow Model `name` in its flavour; returns the model URI.

    Args:
        example: A few input rows (float64); they become the input example and, with the
            estimator's predictions, the signature.
    """
    from mlflow.models import infer_signature

    flavour = flavour_of(estimator)
    sig = None if example is None else infer_signature(example, estimator.predict(example))
    kwargs: dict[str, Any] = dict(name=name, signature=sig, input_example=example, registered_model_name=register,
                                  pip_requirements=_requirements(flavour))
    with fluent_store(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        log = importlib.import_module(f"mlflow.{flavour}").log_model
        if flavour == "xgboost":  # XGBoost's own UBJSON format, no pickle
            info = log(estimator, model_format="ubj", **kwargs)
        else:
            info = log(estimator, serialization_format="skops", skops_trusted_types=trusted_types(estimator), **kwargs)
    client.set_tag(run_id, "practicum.model_uri", f"runs:/{run_id}/{name}")
    client.set_tag(run_id, "practicum.model_flavour", flavour)
    return info.model_uri


def _requirements(flavour: str) -> list[str]:
    """Pinned from this environment, instead of MLflow's inference (it loads the model in a subprocess)."""
    dists = ["mlflow", "numpy", "scikit-learn", *({"lightgbm": ["lightgbm", "skops"], "xgboost": ["xgboost"]}
                                                  .get(flavour, ["skops"]))]
    return [f"{d}=={metadata.version(d)}" for d in dists]
