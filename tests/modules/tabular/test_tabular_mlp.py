"""The tabular MLP (core, pipeline, checkpoint), the tabular study's per-family search, the added data sets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from datamodules.tabular import TabularDataModule
from modules.tabular.model import TabularMLP, TabularMLPConfig
from modules.tabular.module import TabularMLPModule
from pipelines.run import run_experiment
from pipelines.study import load_study
from pipelines.tracking import ConfigError

ROOT = Path(__file__).resolve().parents[3]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize("depth", [1, 3])
def test_mlp_shapes_and_parameter_count(depth):
    d, w, k = 7, 16, 3
    net = TabularMLP(TabularMLPConfig(d, k, width=w, depth=depth, dropout=0.2))
    assert net(torch.zeros(5, d)).shape == (5, k)
    assert sum(p.numel() for p in net.parameters()) == (d * w + w) + (depth - 1) * (w * w + w) + (w * k + k)
    with pytest.raises(ValueError, match="dropout"):
        TabularMLPConfig(d, k, dropout=1.0)


def test_mlp_through_the_pipeline_and_back_from_its_checkpoint(tracking_uri):
    res = run_experiment(ROOT / "configs" / "tabular" / "mlp.yaml",
                         ["--data.init_args.dataset=iris", "--trainer.max_epochs=8", *QUIET], tracking_uri)
    assert res.status == "FINISHED", res.error
    m = MlflowClient(tracking_uri).get_run(res.run_id).data.metrics
    assert m["test/acc"] > 0.6 and m["val/acc"] > 0.6  # 3 classes: well above chance after 8 epochs
    assert 0 < m["perf/fit_time_s"] < m["time/fit_s"] and m["perf/predict_time_s"] > 0  # the callback's
    assert m["params/total"] == (4 * 128 + 128) + (128 * 128 + 128) + (128 * 3 + 3)
    # the checkpoint carries the sizes read from the datamodule, so it loads without one
    model = TabularMLPModule.load_from_checkpoint(res.checkpoint, weights_only=True).eval()
    dm = TabularDataModule("iris", seed=0)
    dm.setup()
    X, y = dm.splits["test"]
    with torch.no_grad():
        acc = (model(torch.from_numpy(X)).argmax(-1).numpy() == y).mean()
    assert acc == pytest.approx(m["test/acc"], abs=1e-6)


def test_each_family_searches_its_own_parameters_under_one_budget():
    study = load_study(ROOT / "configs" / "studies" / "tabular.yaml")
    specs = {name: study.variant_tune[name] for name in study.variants}  # every family is tuned
    assert {(s.n_trials, s.metric, s.direction) for s in specs.values()} == {(4, "val/acc", "maximize")}
    assert "model.init_args.estimator_kwargs.C" in specs["svm-rbf"].params
    assert set(specs["mlp"].params) == set(specs["mlp-raw"].params) != set(specs["lightgbm"].params)
    config, args = study.variant_config("svm-rbf")
    assert config.name == "svm_rbf.yaml" and not any("tune_params" in a for a in args)


def test_tune_params_without_a_tune_block_is_refused(tmp_path):
    (tmp_path / "s.yaml").write_text(
        f"name: s\nbase: {ROOT / 'configs/tabular/mlp.yaml'}\n"
        "variants:\n  a: {tune_params: {model.init_args.lr: {low: 1.0e-4, high: 1.0e-2}}}\n")
    with pytest.raises(ConfigError, match="no tune: block"):
        load_study(tmp_path / "s.yaml")


def test_the_added_data_sets_are_what_they_say():
    from sklearn.datasets import load_diabetes

    dm = TabularDataModule("diabetes", seed=0)
    dm.setup()
    assert dm.num_classes == 2 and dm.num_features == 10
    t = load_diabetes().target
    y = np.concatenate([dm.splits[s][1] for s in ("train", "val", "test")])
    assert y.sum() == (t > np.median(t)).sum()  # above the median: class 1
    syn = TabularDataModule("synthetic", seed=0)
    syn.setup()
    assert (syn.num_features, syn.num_classes) == (40, 4)
    assert sum(len(syn.splits[s][1]) for s in ("train", "val", "test")) == 20_000
