"""The pipeline end to end on the toy project, asserting what MLflow holds afterwards."""

import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines.run import run_experiment
from pipelines.tracking import ConfigError


def test_run_logs_config_metrics_tags_artifacts(toy_config, tracking_uri):
    res = run_experiment(toy_config, ["--model.init_args.lr=0.02"], tracking_uri)
    assert res.status == "FINISHED", res.error
    run = MlflowClient(tracking_uri).get_run(res.run_id)
    assert run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    # the resolved config, with the override and the defaults the YAML left out
    assert p["model.init_args.lr"] == "0.02" and p["model.init_args.fail_at_step"] == "-1"
    assert p["seed"] == "7" and p["data.fingerprint"] == "toy-64"
    assert t["practicum.project"] == "tests" and t["version.torch"] and t["hw.cpu_count"]
    assert len(t["mlflow.source.git.commit"]) == 40 and t["practicum.git_dirty"] in ("true", "false")
    for key in ("train/loss", "val/loss", "test/loss", "params/total", "mem/params_bytes", "mem/grads_bytes",
                "mem/optimizer_bytes", "mem/activations_bytes", "mem/host_peak_rss_bytes", "perf/step_time_s",
                "perf/samples_per_s", "time/fit_s"):
        assert key in m, key
    assert m["params/total"] == 4 * 8 + 8 + 8 + 1
    assert m["mem/params_bytes"] == 4 * m["params/total"]  # float32
    # what the steps were given, exactly: 12 steps of 8 samples; the toy counts no tokens (no CountsTokens)
    assert (m["budget/steps"], m["budget/samples"]) == (12, 12 * 8) and "budget/tokens" not in m
    # throughput is samples over the timed steps' seconds: between 8 samples per slowest and per fastest step
    assert 8 / m["time/fit_s"] < m["perf/samples_per_s"] and m["mem/host_peak_rss_bytes"] > 10 * 2**20
    history = MlflowClient(tracking_uri).get_metric_history(res.run_id, "train/loss")
    assert [h.step for h in history] == sorted({h.step for h in history}) and len(history) >= 5
    # what the MLflow UI draws: a line where a run's latest step is >= 1 (the curves), a bar where it is 0
    for key in ("train/loss", "val/loss"):
        assert max(h.step for h in MlflowClient(tracking_uri).get_metric_history(res.run_id, key)) >= 4, key
    for key in ("test/loss", "mem/params_bytes", "mem/host_peak_rss_increase_bytes", "perf/step_time_s",
                "budget/steps", "time/fit_s", "params/total"):
        assert [h.step for h in MlflowClient(tracking_uri).get_metric_history(res.run_id, key)] == [0], key
    arts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(res.run_id)}
    assert {"config.yaml", "checkpoints"} <= arts
    ckpts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(res.run_id, "checkpoints")}
    assert "checkpoints/last.ckpt" in ckpts
    logged_cfg = yaml.safe_load(Path(run.info.artifact_uri.removeprefix("file://"), "config.yaml").read_text())
    assert logged_cfg["model"]["init_args"]["lr"] == 0.02


def test_failed_run_keeps_metrics_and_checkpoint(toy_config, tracking_uri):
    res = run_experiment(toy_config, ["--model.init_args.fail_at_step=9"], tracking_uri)
    assert res.status == "FAILED" and "injected failure" in res.error
    client = MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FAILED"
    assert "train/loss" in run.data.metrics and "val/loss" in run.data.metrics  # logged before the crash
    assert "injected failure" in run.data.tags["practicum.error"]
    arts = {a.path for a in client.list_artifacts(res.run_id, "checkpoints")}
    assert "checkpoints/last.ckpt" in arts and "checkpoints/on_exception.ckpt" in arts
    assert "error.txt" in {a.path for a in client.list_artifacts(res.run_id)}


def test_bad_value_is_a_config_error_before_any_run(toy_config, tracking_uri):
    with pytest.raises(ConfigError, match="hiddn.*did you mean hidden"):
        run_experiment(toy_config, ["--model.init_args.hiddn=3"], tracking_uri)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        run_experiment(toy_config, ["--model.init_args.lr=-1"], tracking_uri)
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_tracking_uri_from_environment(toy_config, tmp_path, monkeypatch, _empty_store):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(_empty_store, tmp_path / "elsewhere" / "store.db")
    uri = f"sqlite:///{tmp_path}/elsewhere/store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = run_experiment(toy_config, ["--trainer.max_steps=2", "--system_metrics=false"])
    assert res.status == "FINISHED"
    assert MlflowClient(uri).get_run(res.run_id).info.status == "FINISHED"
