"""The MLflow run of one experiment: opened before training, closed with its status at the end.

The pipeline owns MLflow: projects see only the Lightning logger they are handed
(`PracticumLogger`, an ``MLFlowLogger`` on the run opened here).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from pipelines import tracking as trk
from pipelines.spool import SpooledClient, spool_dir

# What a run logs once, at its end: a value, not a curve. The MLflow UI draws a metric as a line chart
# when a run's latest value has a step >= 1, else as a bar (its chart view, mlflow 3.x), so these go to
# step 0 and read as values beside the training curves (train/, val/), which keep their steps.
VALUES = ("test/", "mem/", "perf/", "params/", "budget/", "time/", "disk/")


class PracticumLogger(MLFlowLogger):
    """MLFlowLogger on a run the pipeline opened, writing through the run's `SpooledClient`.

    Hyperparameters are logged once, as the resolved config. Its ``experiment`` is the spooled
    client, so metrics and whatever a project logs through it (``modules.artifacts``) survive a
    tracking outage (`pipelines.spool`). A resumed run skips (key, step) pairs the run already
    holds, so every step is logged exactly once. End-of-run values (`VALUES`) are logged at step 0.
    """

    def __init__(self, client: SpooledClient, run_id: str, experiment_id: str,
                 logged: set[tuple[str, int]] | None = None):
        super().__init__(tracking_uri=client.tracking_uri, run_id=run_id)
        # the run exists and its experiment is known: no get_run on first use, which an outage would fail
        self._mlflow_client, self._experiment_id, self._initialized = client, experiment_id, True
        self._logged = frozenset(logged or ())  # only what the run held before; new steps need no record

    def log_hyperparams(self, params: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        steps = {k: 0 if k.startswith(VALUES) else step or 0 for k in metrics}
        batch = [Metric(k, float(v), now, steps[k]) for k, v in metrics.items()
                 if (k, steps[k]) not in self._logged]  # already in the run before a resume
        if batch:
            self.experiment.log_batch(self.run_id, metrics=batch)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        pass  # the pipeline closes the run itself, after testing and artifact upload


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, read from the launchers' variables (torchrun, Lightning, SLURM)."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        if int(os.environ.get(var, "0") or 0) != 0:
            return False
    return True


class Session:
    """Opens (or, with `resume_run_id`, reopens) the MLflow run; `end` closes it with its status.

    Args:
        uri: The resolved tracking URI (see `tracking.resolve_tracking_uri`).
        experiment: MLflow experiment of a new run.
        run_name: Its name.
        tags: Its tags (the environment's are added).
        system_metrics: Sample CPU/RAM/GPU with MLflow's monitor.
        log_checkpoint: Upload the run's checkpoints when it ends.
        resume_run_id: Continue this run instead of creating one.
    """

    def __init__(self, uri: str, experiment: str, run_name: str | None, tags: dict[str, str],
                 system_metrics: bool, log_checkpoint: bool, resume_run_id: str | None = None):
        self.uri = uri
        self.log_checkpoint = log_checkpoint
        self.is_zero = is_rank_zero()
        self.resumed = resume_run_id is not None
        self._monitor = None
        self._refusal: BaseException | None = None
        self.client, self.logger = None, None
        if not self.is_zero:
            # Other ranks never touch MLflow (not even to open the store: under torchrun every rank
            # starts at once, and two processes creating one SQLite schema collide): one run, not N.
            # Lightning's own launcher hands rank 0's run id down through the environment; under
            # torchrun ModelCheckpoint broadcasts rank 0's folder.
            self.run_id = os.environ.get("PRACTICUM_RUN_ID", "rank-local")
            return
        client = trk.MlflowClient(uri)
        trk.check_reachable(client, uri)
        logged: set[tuple[str, int]] = set()
        if resume_run_id:
            self.run_id = resume_run_id
            exp_id = client.get_run(resume_run_id).info.experiment_id
            for key in client.get_run(resume_run_id).data.metrics:
                logged |= {(key, m.step) for m in client.get_metric_history(resume_run_id, key)}
            client.update_run(resume_run_id, status="RUNNING")
        else:
            exp_id = trk.get_or_create_experiment(client, experiment, uri)
            tags = {**trk.environment_tags(), **tags, **({"mlflow.runName": run_name} if run_name else {})}
            self.run_id = client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id
        os.environ["PRACTICUM_RUN_ID"] = self.run_id
        # From here on every write to the run goes through its spool (pipelines.spool).
        self.client = SpooledClient(uri, self.run_id, spool_dir(trk.local_dir(uri), self.run_id))
        self.spool = self.client.spool
        self.logger = PracticumLogger(self.client, self.run_id, exp_id, logged=logged)
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=uri,
                                                     resume_logging=self.resumed)
                self._monitor._start_step = self._monitor._logging_step
                if hasattr(getattr(self._monitor, "mlflow_logger", None), "client"):
                    self._monitor.mlflow_logger.client = self.client  # its samples go through the spool too
                self._monitor.start()
            except Exception as e:  # missing psutil/pynvml parts must not stop training
                print(f"warning: system metrics off ({e})", file=sys.stderr)

    @property
    def ckpt_dir(self):
        return trk.checkpoint_dir(self.uri, self.run_id)

    def log_config(self, dump: str, params: dict[str, Any]) -> None:
        """The resolved config as ``config.yaml`` and as flat parameters (a new run only)."""
        if self.is_zero and not self.resumed:
            self.client.log_text(self.run_id, dump, "config.yaml")
            trk.log_params(self.client, self.run_id, params)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.is_zero:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    def end(self, status: str, error: BaseException | None = None) -> tuple[str, BaseException | None]:
        """Upload the error and checkpoints, send what is queued, set the status; returns the final (status, error).

        Never raises. A tracking outage is waited out for `PRACTICUM_TRACKING_WAIT_S` seconds (default
        60); what has still not arrived then stays in the run's spool folder for ``practicum sync``,
        and the run keeps its own status. A write the store refuses (a full disk) turns the run FAILED
        with that message.
        """
        if not self.is_zero:
            return status, error
        if self._monitor is not None:
            self._monitor.finish()
            final_system_sample(self._monitor)
        deadline = time.monotonic() + float(os.environ.get("PRACTICUM_TRACKING_WAIT_S", "60"))
        try:
            if error is not None:
                self.client.set_tag(self.run_id, "practicum.error", one_line(error))
                tb = trk.redact("".join(traceback.format_exception(type(error), error, error.__traceback__)))
                self.client.log_text(self.run_id, tb, "error.txt")
            if self.log_checkpoint and self.ckpt_dir.is_dir():
                for ckpt in sorted(self.ckpt_dir.glob("*.ckpt")):  # a sharded (FSDP) checkpoint is a folder
                    self.spool.artifact(ckpt, f"checkpoints/{ckpt.name}" if ckpt.is_dir() else "checkpoints", copy=False)
        except Exception as e:  # refused, not unreachable: the spool raises only those
            status, error = self._refused(e)
        sent, status, error = self._send_all(deadline, status, error)
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            status, error = self._refused(e)
        sent, status, error = self._send_all(deadline, status, error)
        if not sent:
            print(f"warning: the tracking store at {self.uri} was unreachable until the end: {len(self.spool.queue)} "
                  f"writes of run {self.run_id} (status {status}) are kept in {self.spool.folder}; send them once "
                  f"it is back with: practicum sync {self.run_id}", file=sys.stderr)
        return status, error

    def _send_all(self, deadline: float, status: str, error: BaseException | None):
        while True:  # each refusal drops the write it refused; the rest still go
            try:
                return self.spool.flush(max(deadline - time.monotonic(), 0.0)), status, error
            except Exception as e:
                status, error = self._refused(e)

    def _refused(self, e: BaseException) -> tuple[str, BaseException]:
        """A write the store refused turns the run FAILED; the first refusal is the error reported."""
        if self._refusal is None:
            if isinstance(e, OSError):
                e = OSError(e.errno, f"could not write artifacts of run {self.run_id}: {e.strerror or e} "
                                     f"(local checkpoints stay in {self.ckpt_dir}); free space on the artifact store")
            self._refusal = e
            try:
                self.client.set_tag(self.run_id, "practicum.error", one_line(e))
            except Exception:  # a second refusal, raised by the queue behind the tag: the first one is reported
                pass
        return "FAILED", self._refusal


def final_system_sample(monitor) -> None:
    """Publish the samples a short run collected but never sent: MLflow's monitor publishes at the end of
    each interval, so a run shorter than one interval would show an empty System metrics tab."""
    if monitor._logging_step > monitor._start_step:
        return
    try:
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # the figures are a courtesy; the run's own record is complete without them
        print(f"warning: no system metrics for this run ({e})", file=sys.stderr)


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return trk.redact(f"{type(e).__name__}: {msg[0] if msg else ''}")[:500]
