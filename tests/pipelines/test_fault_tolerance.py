"""Fault tolerance: SIGKILL then resume into the same run, SIGTERM, NaN, corrupt checkpoints, tracking outages."""

import errno
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipelines.run import run_experiment
from pipelines.tracking import ConfigError, TrackingError
from tests.helpers import free_port
from tests.pipelines.test_run import TOY

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--system_metrics=false"]

# A mini-GPT small enough to train 40 steps in seconds; its batches are a function of (seed, step).
GPT = {
    "seed_everything": 3,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 40, "val_check_interval": 10,
                "check_val_every_n_epoch": None, "log_every_n_steps": 1, "enable_progress_bar": False,
                "enable_model_summary": False, "gradient_clip_val": 1.0},
    "model": {"class_path": "modules.gpt.module.GPTModule",
              "init_args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                            "lr_decay_steps": 40, "sample_tokens": 8}},
    "data": {"class_path": "datamodules.shakespeare.ShakespeareDataModule",
             "init_args": {"corpus": "shakespeare-plays", "block_size": 32, "batch_size": 8, "val_windows": 32,
                           "max_chars": 200_000}},
}


def _write(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tracking_uri, practicum_cli):
    cfg = _write(tmp_path, GPT)
    whole = run_experiment(cfg, [*QUIET, "--checkpoint_every_n_steps=5"], tracking_uri)
    assert whole.status == "FINISHED", whole.error

    killer = {"class_path": "tests.pipelines.toy.SignalAt", "init_args": {"step": 23, "sig": "SIGKILL"}}
    r = practicum_cli("run", str(cfg), *QUIET, "--checkpoint_every_n_steps=5", f"--tracking_uri={tracking_uri}",
             f"--trainer.callbacks={yaml.safe_dump([killer], default_flow_style=True).strip()}")
    assert r.returncode == -9, r.stderr[-2000:]
    client = MlflowClient(tracking_uri)
    killed = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "attributes.status = 'RUNNING'")
    assert len(killed) == 1  # a SIGKILLed process could not close its run
    run_id = killed[0].info.run_id

    resumed = run_experiment(cfg, [*QUIET, "--checkpoint_every_n_steps=5", "--resume=last"], tracking_uri)
    assert resumed.status == "FINISHED" and resumed.run_id == run_id  # the same MLflow run continued
    assert abs(resumed.metrics["val/loss"] - whole.metrics["val/loss"]) < 1e-4
    for key in ("train/loss", "val/loss"):
        got, want = _history(client, run_id, key), _history(client, whole.run_id, key)
        assert [s for s, _ in got] == [s for s, _ in want]  # every step exactly once, none missing
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sigterm_ends_killed_with_a_checkpoint(tmp_path, tracking_uri, practicum_cli):
    term = {"class_path": "tests.pipelines.toy.SignalAt", "init_args": {"step": 7, "sig": "SIGTERM"}}
    cfg = _write(tmp_path, {**TOY, "trainer": {**TOY["trainer"], "max_steps": 200}})
    r = practicum_cli("run", str(cfg), *QUIET, f"--tracking_uri={tracking_uri}",
             f"--trainer.callbacks={yaml.safe_dump([term], default_flow_style=True).strip()}")
    assert r.returncode == 1 and "KILLED" in r.stdout
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert "checkpoints/on_exception.ckpt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


def test_nan_loss_fails_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, tracking_uri):
    cfg = _write(tmp_path, TOY)
    res = run_experiment(cfg, [*QUIET, "--model.init_args.nan_at_step=9", "--checkpoint_every_n_steps=4"],
                         tracking_uri)
    assert res.status == "FAILED" and "at step 9" in res.error and "nan" in res.error
    run = MlflowClient(tracking_uri).get_run(res.run_id)
    assert run.info.status == "FAILED" and "train/loss" in run.data.metrics
    ckpt = torch.load(Path("mlruns/checkpoints") / res.run_id / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tracking_uri):
    cfg = _write(tmp_path, TOY)
    res = run_experiment(cfg, QUIET, tracking_uri)
    last = Path("mlruns/checkpoints") / res.run_id / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        run_experiment(cfg, [*QUIET, f"--resume={res.run_id}"], tracking_uri)
    from pipelines.cli import main

    assert main(["generate", str(last)]) == 2


def test_unreachable_server_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path, TOY)
    t0 = time.time()
    with pytest.raises(TrackingError, match="not usable"):
        run_experiment(cfg, QUIET, f"http://127.0.0.1:{free_port()}")
    assert time.time() - t0 < 60
    assert not Path("mlruns/checkpoints").exists()  # nothing was trained


def test_full_disk_while_writing_artifacts_ends_failed(tmp_path, tracking_uri, monkeypatch):
    real = MlflowClient.log_artifact

    def full(self, run_id, local_path, artifact_path=None):  # the disk fills up when the checkpoints go out
        if str(local_path).endswith(".ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", full)
    res = run_experiment(_write(tmp_path, TOY), QUIET, tracking_uri)
    assert res.status == "FAILED" and "No space left on device" in res.error
    run = MlflowClient(tracking_uri).get_run(res.run_id)
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["practicum.error"]
    assert "val/loss" in run.data.metrics


# Tracking outages mid-run (every write buffered, `practicum sync`): tests/pipelines/test_outage.py
