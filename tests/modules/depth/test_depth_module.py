"""DepthModule through the real pipeline on tiny data: what it logs per step and at the end."""

from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipelines.run import run_experiment
from pipelines.study import load_study

ROOT = Path(__file__).resolve().parents[3]


def test_pipeline_run_logs_gradient_norms_ratio_activations_and_the_figure(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_experiment(
        ROOT / "configs/depth/mlp_mnist5k.yaml",
        ["--model.init_args.depth=6", "--trainer.max_epochs=1", "--trainer.max_steps=6", "--trainer.log_every_n_steps=2",
         "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
         "--data.init_args.train_limit=384", "--system_metrics=false"],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(uri)
    m = client.get_run(res.run_id).data.metrics
    layers = [f"grad_norm/layer_{i:02d}" for i in range(1, 7)]
    for key in [*layers, "grad_norm/stem", "grad_norm/head", "grad_norm/total", "grad_ratio/first_last",
                "grad_ratio/first_last_gmean", "act_std/layer_00", "act_sat/layer_06", "act_mean/layer_03",
                "train/loss", "train/loss_epoch", "val/acc", "test/acc"]:
        assert key in m and np.isfinite(m[key]), key
    assert "act_std/layer_07" not in m and "grad_norm/layer_07" not in m  # depth 6: 6 blocks, 7 activations
    # measured at every 2nd of 6 steps, exactly where Lightning logs train/loss
    history = client.get_metric_history(res.run_id, "grad_ratio/first_last")
    assert sorted(h.step for h in history) == sorted(h.step for h in client.get_metric_history(res.run_id, "train/loss"))
    assert len(history) == 3  # 384 images / 64 = 6 steps, logged after steps 2, 4 and 6
    for h in history:  # the ratio is the two logged norms' ratio at the same step
        first = {x.step: x.value for x in client.get_metric_history(res.run_id, layers[0])}[h.step]
        last = {x.step: x.value for x in client.get_metric_history(res.run_id, layers[-1])}[h.step]
        assert h.value == pytest.approx(first / last, rel=1e-6)
    # plain sigmoid at depth 6 with torch's default init: the first block learns far slower than the last
    assert m["grad_ratio/first_last_gmean"] < 1e-2
    gmean = np.exp(np.mean(np.log([h.value for h in history])))
    assert m["grad_ratio/first_last_gmean"] == pytest.approx(gmean, rel=1e-5)
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert "grad_norm_by_layer.png" in arts


def test_bad_module_arguments_are_clear_errors():
    from modules.depth.module import DepthModule

    with pytest.raises(ValueError, match="lr must be > 0"):
        DepthModule(lr=0)
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        DepthModule(optimizer="lbfgs")


@pytest.mark.parametrize("name", ["depth-vs-residual", "norm-layers"])
def test_studies_compare_what_their_bars_need(name):
    study = load_study(ROOT / f"configs/studies/{name}.yaml")
    assert len(study.seeds) >= 3 and study.report == "test"
    assert "train/loss_epoch" in study.columns and "test/acc" in [c.replace("val/", "test/") for c in study.columns]
