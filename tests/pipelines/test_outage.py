"""Tracking outages: every write of a run goes through one retry buffer (pipelines.spool), and what a run
could not send before it ended is kept on disk until `practicum sync` sends it.

The pipeline tests run twice: against a simulated outage (MLflow's client refuses to connect; fast) and
against a real `mlflow server` on loopback that is stopped mid-run and restarted.
"""

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from pipelines.cli import main
from pipelines.run import run_experiment
from pipelines.spool import Spool, is_outage, spool_dir
from tests.data import shakespeare_text
from tests.helpers import free_port
from tests.pipelines import toy

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--system_metrics=false"]
REFUSED = "API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception ConnectionError"

# the mini-GPT preset (logs a text sample at every validation and at the end), as small as it goes
GPT = ["--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=16",
       "--model.init_args.warmup_steps=2", "--model.init_args.lr_decay_steps=20", "--model.init_args.sample_tokens=8",
       "--data.init_args.max_chars=20000", "--data.init_args.block_size=16", "--data.init_args.batch_size=4",
       "--data.init_args.val_windows=8", "--trainer.max_steps=20", "--trainer.val_check_interval=10",
       "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false", *QUIET]
# DDPM (logs an image grid at every validation, a final grid, a denoising strip and a loss curve), no judge
DDPM = ["--model.init_args.block_out_channels=[8, 16]", "--model.init_args.attention=[false, false]",
        "--model.init_args.num_timesteps=20", "--model.init_args.num_sample_steps=1",
        "--model.init_args.guidance_scale=1.0",
        "--model.init_args.num_eval_samples=10", "--model.init_args.eval_batch_size=10",
        "--model.init_args.classifier_checkpoint=null", "--model.init_args.select_guidance=null",
        "--model.init_args.select_sample_steps=null", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.batch_size=8", "--data.init_args.train_limit=32", *QUIET]
DDPM_ARTIFACTS = {"samples/step_0000002.png", "samples/final.png",
                  "samples/denoising_strip.png", "loss_curve.png", "config.yaml",
                  "checkpoints/best.ckpt", "checkpoints/last.ckpt"}


# ---- the buffer itself, on a fake store -----------------------------------------------------


class FakeStore:
    """Records the writes that arrive; while `down`, refuses connections as MLflow's REST client reports them."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self):
        self.down, self.calls, self.refuse = False, [], None

    def _arrive(self, *call):
        if self.down:
            raise MlflowException(REFUSED)
        if self.refuse and self.refuse(call):
            raise MlflowException.invalid_parameter_value("Changing param values is not allowed")
        self.calls.append(call)

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._arrive("batch", [(m.key, m.step) for m in metrics], [(p.key, p.value) for p in params],
                     [(t.key, t.value) for t in tags])

    def log_artifact(self, run_id, path, artifact_path=None):
        self._arrive("artifact", Path(path).read_text(), artifact_path)

    def log_artifacts(self, run_id, path, artifact_path=None):
        self._arrive("artifacts", sorted(p.name for p in Path(path).iterdir()), artifact_path)

    def set_terminated(self, run_id, status, end_time=None):
        self._arrive("terminate", status)


def test_outage_queues_writes_in_order_keeps_them_on_disk_and_delivers_them_later(tmp_path):
    store = FakeStore()
    spool = Spool(store, "r1", tmp_path / "spool" / "r1", retry_s=0.0)
    spool.batch(metrics=[Metric("loss", 1.0, 0, 0)])  # store up: sent at once, nothing on disk
    assert store.calls == [("batch", [("loss", 0)], [], [])] and not spool.folder.exists()

    store.down = True
    spool.batch(metrics=[Metric("loss", 0.9, 0, 1)])
    tmp = tmp_path / "sample.txt"
    tmp.write_text("to be, or not")
    spool.artifact(tmp, "samples")
    tmp.unlink()  # MLflow's log_text hands over a temporary file: the queued write must hold its own copy
    spool.batch(metrics=[Metric("loss", 0.8, 0, 2)], params=[Param("lr", "0.1")], tags=[RunTag("a", "1")])
    spool.batch(metrics=[Metric("loss", 0.7, 0, 3)], tags=[RunTag("a", "2")])
    spool.terminate("FINISHED")
    assert len(store.calls) == 1 and len(spool.queue) == 5
    assert not spool.flush(0.2)  # still down: the budget runs out, the writes stay queued

    # a later process (practicum sync) finds the same writes on disk, in order
    again = Spool.load(spool.folder, client=store)
    assert again.queue == spool.queue and again.run_id == "r1"
    store.down = False
    assert again.flush(0)
    assert store.calls[1:] == [
        ("batch", [("loss", 1)], [], []),
        ("artifact", "to be, or not", "samples"),
        # consecutive batches go out as one request; a tag set twice keeps the later value
        ("batch", [("loss", 2), ("loss", 3)], [("lr", "0.1")], [("a", "2")]),
        ("terminate", "FINISHED"),
    ]
    assert not spool.folder.exists()  # delivered: the journal and its copies are gone


def test_a_write_the_store_refuses_raises_and_is_not_retried(tmp_path):
    store = FakeStore()
    store.refuse = lambda call: call[0] == "batch" and ("lr", "0.2") in call[2]
    spool = Spool(store, "r1", tmp_path / "r1", retry_s=0.0)
    with pytest.raises(MlflowException, match="Changing param"):
        spool.batch(params=[Param("lr", "0.2")])
    store.down = True
    spool.batch(params=[Param("lr", "0.2")])
    spool.batch(metrics=[Metric("loss", 1.0, 0, 0)])
    store.down = False
    with pytest.raises(MlflowException, match="Changing param"):
        spool.drain(force=True)
    assert spool.flush(0) and store.calls == [("batch", [("loss", 0)], [], [])]


def test_what_arrived_and_a_line_cut_short_by_a_kill_are_not_sent_again(tmp_path):
    store = FakeStore()
    store.down = True
    spool = Spool(store, "r1", tmp_path / "r1", retry_s=0.0)
    spool.batch(metrics=[Metric("loss", 1.0, 0, 0)])
    spool.artifact(tmp_path, "dir", copy=False)  # not a batch: the batches around it are not merged
    spool.batch(metrics=[Metric("loss", 1.0, 0, 1)])
    spool.terminate("FINISHED")
    store.down = False
    store.refuse = lambda call: call[0] == "terminate"
    with pytest.raises(MlflowException):
        spool.drain(force=True)  # three writes arrived, the fourth was refused and dropped
    assert [c[0] for c in store.calls] == ["batch", "artifacts", "batch"] and spool.queue == []
    store.down = True
    spool.terminate("FAILED")
    with open(spool.folder / "journal.jsonl", "a") as f:
        f.write('{"op": "batch", "metr')  # killed mid-write
    assert [op["status"] for op in Spool.load(spool.folder, client=store).queue] == ["FAILED"]


def test_outage_and_refusal_are_told_apart():
    assert is_outage(MlflowException(REFUSED))
    assert is_outage(requests.exceptions.ConnectionError("refused"))
    assert is_outage(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    response = requests.Response()
    response.status_code = 503
    assert is_outage(requests.exceptions.HTTPError(response=response))
    response.status_code = 400
    assert not is_outage(requests.exceptions.HTTPError(response=response))
    assert not is_outage(MlflowException.invalid_parameter_value("bad value"))
    assert not is_outage(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_outage(OSError(errno.ENOSPC, "No space left on device"))


# ---- the pipeline through an outage -------------------------------------------------------------


class Simulated:
    """MLflow's client cannot reach the store while stopped (what it raises when a server is down)."""

    def __init__(self, tmp_path, monkeypatch, empty_store):
        (tmp_path / "mlruns").mkdir()
        shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")
        self.uri, self.up = f"sqlite:///{tmp_path}/mlruns/mlflow.db", True
        for name in ("log_batch", "log_artifact", "log_artifacts", "set_terminated", "log_param", "set_tag"):
            real = getattr(MlflowClient, name)
            monkeypatch.setattr(MlflowClient, name, self._guard(real))

    def _guard(self, real):
        def call(client, *a, **kw):
            if not self.up:
                raise MlflowException(REFUSED)
            return real(client, *a, **kw)

        return call

    def start(self):
        self.up = True

    def stop(self):
        self.up = False


class Server:
    """`mlflow server` on a loopback port over one SQLite file, stoppable and restartable."""

    def __init__(self, root: Path, empty_store):
        shutil.copy(empty_store, root / "server.db")
        self.port, self.root, self.proc = free_port(), root, None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root}/server.db", "--artifacts-destination",
             str(self.root / "art"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(480):
            try:
                requests.get(f"{self.uri}/health", timeout=1)
                return
            except requests.exceptions.RequestException:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(60)


@pytest.fixture(params=["simulated", "server"])
def store(request, tmp_path, monkeypatch, _empty_store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    s = Simulated(tmp_path, monkeypatch, _empty_store) if request.param == "simulated" else Server(tmp_path, _empty_store)
    toy.HOOKS.clear()
    yield s
    toy.HOOKS.clear()
    if isinstance(s, Server):
        s.stop()


def _history(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id, folder=None):
    out = set()
    for a in client.list_artifacts(run_id, folder):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


CALL_AT = '--trainer.callbacks=[{"class_path": "tests.pipelines.toy.CallAt"}]'  # runs toy.HOOKS[step]()


@pytest.mark.slow
def test_gpt_samples_checkpoints_and_metrics_logged_during_an_outage_arrive_when_the_server_is_back(store):
    # down after step 3, back after step 15: the sample of step 10 and the metrics of steps 4-15 wait
    toy.HOOKS.update({3: store.stop, 15: store.start})
    res = run_experiment(ROOT / "configs/gpt/shakespeare_char_cpu.yaml",
                         [*GPT, f"--data.init_args.path={shakespeare_text()}", CALL_AT], store.uri)
    assert res.status == "FINISHED", res.error
    client = MlflowClient(store.uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, res.run_id, "train/loss") == list(range(20))
    assert _history(client, res.run_id, "val/loss") == [9, 19]
    assert run.data.params["model.init_args.n_embd"] == "16" and "perf/step_time_s" in run.data.metrics
    assert {"config.yaml", "samples/step_000010.txt", "samples/step_000020.txt", "samples/final.txt",
            "checkpoints/best.ckpt", "checkpoints/last.ckpt"} <= _artifacts(client, res.run_id)
    assert not spool_dir(Path("mlruns"), res.run_id).exists()


@pytest.mark.slow
def test_ddpm_run_outlasting_the_server_keeps_its_grids_locally_until_practicum_sync(store, monkeypatch, capsys):
    # down after step 1 and still down when the run ends: it does not fail, and nothing is lost
    monkeypatch.setenv("PRACTICUM_TRACKING_WAIT_S", "1")
    toy.HOOKS.update({1: store.stop})
    res = run_experiment(ROOT / "configs/diffusion/ddpm_mnist_cpu.yaml",
                         [*DDPM, CALL_AT], store.uri)
    assert res.status == "FINISHED", res.error
    assert f"practicum sync {res.run_id}" in capsys.readouterr().err
    spooled = spool_dir(Path("mlruns"), res.run_id)
    assert (spooled / "journal.jsonl").is_file()

    store.start()
    client = MlflowClient(store.uri)
    assert client.get_run(res.run_id).info.status == "RUNNING"  # its end was spooled too
    assert main(["sync", res.run_id]) == 0
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, res.run_id, "train/loss") == [0, 1]
    assert {"val/loss", "test/loss"} <= set(run.data.metrics) and run.data.params["data.fingerprint"]
    assert DDPM_ARTIFACTS <= _artifacts(client, res.run_id)
    assert not spooled.exists()
    assert main(["sync"]) == 0  # nothing left to send
