"""A run shorter than MLflow's sampling interval still shows its System metrics."""

import yaml
from mlflow import MlflowClient

from pipelines.run import run_experiment
from tests.pipelines.toy import TOY


def test_a_two_second_run_has_system_metrics(tmp_path, tracking_uri):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    res = run_experiment(cfg, ["--trainer.max_steps=2", "--system_metrics=true"], tracking_uri)
    assert res.status == "FINISHED", res.error
    client = MlflowClient(tracking_uri)
    keys = [k for k in client.get_run(res.run_id).data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys
    assert len(client.get_metric_history(res.run_id, "system/cpu_utilization_percentage")) == 1
