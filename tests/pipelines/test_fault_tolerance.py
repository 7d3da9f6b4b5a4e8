"""Fault tolerance: SIGKILL then resume into the same run, SIGTERM, NaN, corrupt checkpoints, tracking outages."""

import errno
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback
from mlflow import MlflowClient

from pipelines.run import run_experiment
from pipelines.tracking import ConfigError, TrackingError
from tests.helpers import GPT_RUN, free_port
from tests.pipelines.toy import TOY

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--system_metrics=false"]

GPT = GPT_RUN


def _write(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
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


class Die(Callback):
    """Raises after training step `step` ("train"), or as the validation that follows it begins ("val"):
    a crash at an exact point, in process. It runs before the pipeline's callbacks, so a checkpoint due
    at that step is not written, as under a real kill."""

    def __init__(self, step: int, where: str = "train"):
        self.step, self.where = step, where

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "train" and trainer.global_step == self.step:
            raise RuntimeError(f"killed after step {self.step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.where == "val" and trainer.global_step == self.step and not trainer.sanity_checking:
            raise RuntimeError(f"killed while validating at step {self.step}")


# Keys that measure the machine rather than the run (wall time, throughput, RSS) are not compared.
MACHINE = ("time/", "perf/", "system/", "mem/host_peak_rss")  # the process's host peak and the run's own


def _measures_machine(key: str) -> bool:
    return key.startswith(MACHINE) or key.endswith("_per_s")


def _all_histories(client, run_id) -> dict[str, dict[int, float]]:
    """{key: {step: value}}; a key logged twice at one step with one value (``epoch``, by training and
    by validation) counts once: a resumed run logs each (key, step) once."""
    keys = [k for k in client.get_run(run_id).data.metrics if not _measures_machine(k)]
    return {k: dict(_history(client, run_id, k)) for k in sorted(keys)}


def _kill_resume_compare(cfg, args, uri, kills):
    """The uninterrupted run, then for each (step, where) a run killed there and resumed: every
    metric key at every step must equal the uninterrupted run's within 1e-4."""
    client = MlflowClient(uri)
    whole = run_experiment(cfg, [*QUIET, *args], uri)
    assert whole.status == "FINISHED", whole.error
    want = _all_histories(client, whole.run_id)
    assert max(want["mem/grads_bytes"].values()) > 0 and "val/loss" in want
    for step, where in kills:
        killed = run_experiment(cfg, [*QUIET, *args], uri, callbacks=[Die(step, where)])
        assert killed.status == "FAILED" and f"step {step}" in killed.error, killed.error
        resumed = run_experiment(cfg, [*QUIET, *args, f"--resume={killed.run_id}"], uri)
        assert resumed.status == "FINISHED" and resumed.run_id == killed.run_id, resumed.error
        got = _all_histories(client, resumed.run_id)
        point = f"killed at step {step} ({where})"
        assert got.keys() == want.keys(), f"{point}: keys differ: {sorted(got.keys() ^ want.keys())}"
        for key in want:
            assert sorted(got[key]) == sorted(want[key]), f"{point}: {key} logged at other steps"
            bad = [(s, got[key][s], b) for s, b in want[key].items() if abs(got[key][s] - b) > 1e-4 * max(1.0, abs(b))]
            assert not bad, f"{point}: {key} differs (step, resumed, uninterrupted): {bad[:3]}"


# The endless Shakespeare stream: validation every 10 steps, last.ckpt every 4.
TINY_GPT = {**GPT, "trainer": {**GPT["trainer"], "max_steps": 24},
            "model": {**GPT["model"], "init_args": {**GPT["model"]["init_args"], "n_layer": 1, "n_embd": 16,
                                                    "lr_decay_steps": 24}},
            "data": {**GPT["data"], "init_args": {**GPT["data"]["init_args"], "block_size": 16, "batch_size": 4,
                                                  "val_windows": 16, "max_chars": 50_000}}}


def test_resumed_stream_run_logs_what_the_uninterrupted_one_does(tmp_path, tracking_uri):
    """Killed just before a validation step, during it (the step-20 checkpoint falls on it), just
    after it: the resumed run validates, samples and logs on the same steps with the same values."""
    _kill_resume_compare(_write(tmp_path, TINY_GPT), ["--checkpoint_every_n_steps=4"], tracking_uri,
                         [(19, "train"), (20, "val"), (21, "train")])


# Map-style MNIST: 5 batches an epoch, validation at each epoch's end, last.ckpt every 2 steps.
MNIST = {
    "seed_everything": 5,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 13, "log_every_n_steps": 1,
                "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"class_path": "modules.classifier.module.ClassifierModule", "init_args": {"lr": 3e-3}},
    "data": {"class_path": "datamodules.mnist.MNISTDataModule",
             "init_args": {"batch_size": 32, "train_limit": 160, "val_size": 64, "test_size": 32}},
}


def test_resumed_map_style_run_logs_what_the_uninterrupted_one_does(tmp_path, tracking_uri):
    """Killed mid-epoch between checkpoints, during the epoch-end validation (the step-10 checkpoint
    falls on it), just after it: the resumed run takes the rest of the epoch's order (dropout's RNG
    included) and logs what the uninterrupted run logs."""
    _kill_resume_compare(_write(tmp_path, MNIST), ["--checkpoint_every_n_steps=2"], tracking_uri,
                         [(7, "train"), (10, "val"), (11, "train")])


def test_resumed_run_measures_its_memory_ledger(tmp_path, tracking_uri):
    """The ledger (gradient and activation bytes) is measured at the first steps of every fit: a
    resumed run reports the uninterrupted run's, not zeros."""
    cfg = _write(tmp_path, TOY)
    whole = run_experiment(cfg, [*QUIET, "--checkpoint_every_n_steps=2"], tracking_uri)
    killed = run_experiment(cfg, [*QUIET, "--checkpoint_every_n_steps=2"], tracking_uri, callbacks=[Die(9)])
    resumed = run_experiment(cfg, [*QUIET, "--checkpoint_every_n_steps=2", f"--resume={killed.run_id}"], tracking_uri)
    assert resumed.status == "FINISHED", resumed.error
    for key in ("mem/grads_bytes", "mem/activations_bytes", "mem/optimizer_bytes", "budget/samples"):
        assert whole.metrics[key] > 0 and resumed.metrics[key] == whole.metrics[key], key


def test_first_checkpoint_comes_by_time_before_any_validation(tmp_path, tracking_uri):
    """Without --checkpoint_every_n_steps a run killed before its first validation still has a
    last.ckpt to resume from: the time-based default (here 0 minutes: at the first step)."""
    cfg = _write(tmp_path, {**TINY_GPT, "trainer": {**TINY_GPT["trainer"], "val_check_interval": 20}})
    killed = run_experiment(cfg, [*QUIET, "--checkpoint_every_n_minutes=0.0001"], tracking_uri,
                            callbacks=[Die(6)])
    assert killed.status == "FAILED"
    ckpt = torch.load(Path("mlruns/checkpoints") / killed.run_id / "last.ckpt", weights_only=True)
    assert 1 <= ckpt["global_step"] <= 6


@pytest.mark.slow
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
    # every 3 steps: step 8 closes an epoch with a validation, where LastCheckpoint skips a periodic save
    res = run_experiment(cfg, [*QUIET, "--model.init_args.nan_at_step=9", "--checkpoint_every_n_steps=3"],
                         tracking_uri)
    assert res.status == "FAILED" and "at step 9" in res.error and "nan" in res.error
    run = MlflowClient(tracking_uri).get_run(res.run_id)
    assert run.info.status == "FAILED" and "train/loss" in run.data.metrics
    ckpt = torch.load(Path("mlruns/checkpoints") / res.run_id / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 9  # the last good step: the NaN comes in the batch after it
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
