"""The retry buffer every write of a run goes through: metrics, params, tags, artifacts, its end status.

A tracking outage must neither fail a run nor lose what it logs. Every write to the run goes
through its `Spool`: a write that cannot be sent because the store is unreachable (connection
refused or reset, a timeout, HTTP 5xx or 429) is queued, in order, and retried with later writes
(at most once per `retry_s`) and at the end of the run for a bounded time. Queued writes are
journaled on disk as they are queued, in ``<local store>/spool/<run_id>/`` (``journal.jsonl``, the
files they upload under ``files/``, ``sent``: how many journal lines have arrived), so what is
still queued when the run ends, or when its process dies, is kept there and
``practicum sync RUN_ID`` sends it once the server is back. A write the store rejects (a bad value,
a full disk) is not an outage: it raises, as it would without the buffer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# MLflow's caps on one log_batch call
MAX_ENTITIES, MAX_PARAMS, MAX_TAGS = 1000, 100, 100


def is_outage(e: BaseException) -> bool:
    """Whether `e` says the store could not be reached (retry later) rather than that it refused the write."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, requests.exceptions.HTTPError):
        code = e.response.status_code if e.response is not None else 500
        return code >= 500 or code in (408, 429)
    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, MlflowException):  # MLflow's REST client wraps connection failures as INTERNAL_ERROR (500)
        code = e.get_http_status_code()
        return code >= 500 or code in (408, 429)
    return False


def spool_dir(local_dir: Path, run_id: str) -> Path:
    return Path(local_dir) / "spool" / run_id


class Spool:
    """The ordered queue of one run's writes that have not reached the store yet.

    Args:
        client: Sends the writes (a plain ``MlflowClient`` on the run's store).
        run_id: The run written to.
        folder: The journal's folder (`spool_dir`); created on the first queued write.
        retry_s: Wait this long after a failed send before trying again during training.
    """

    def __init__(self, client: MlflowClient, run_id: str, folder: Path, retry_s: float = 5.0):
        self.client, self.run_id, self.folder, self.retry_s = client, run_id, Path(folder), retry_s
        self.queue: list[dict[str, Any]] = []  # journal lines from `sent` on, in order
        self._sent = 0
        self._unmerged = 0  # this many writes at the head of the queue go out one by one
        self._next_try = 0.0
        self._warned = False
        self._lock = threading.RLock()  # MLflow's system-metrics thread writes too
        self._owner = threading.current_thread()  # only it drains the queue, so a refusal surfaces there

    @classmethod
    def load(cls, folder: Path, client: MlflowClient | None = None) -> Spool:
        """A spool left behind by an earlier process (for `practicum sync`)."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        spool = cls(client or MlflowClient(meta["tracking_uri"]), meta["run_id"], folder)
        lines = (folder / "journal.jsonl").read_text().splitlines() if (folder / "journal.jsonl").exists() else []
        spool._sent = int((folder / "sent").read_text()) if (folder / "sent").exists() else 0
        # a line cut short by a kill mid-write was never acknowledged to the caller: nothing to send
        spool.queue = [json.loads(s) for s in lines[spool._sent :] if s.endswith("}")]
        return spool

    # -- writes ----------------------------------------------------------------------------
    def batch(self, metrics=(), params=(), tags=()) -> None:
        self.submit({"op": "batch", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                     "params": [[p.key, str(p.value)] for p in params], "tags": [[t.key, str(t.value)] for t in tags]})

    def artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None, copy: bool = True) -> None:
        """A file or folder. `copy`: the file may be gone by the time it is sent (a temporary file), so a
        queued one is copied into the spool; False for files that stay put (the run's checkpoints)."""
        self.submit({"op": "artifact", "path": str(Path(local_path).resolve()), "dir": artifact_path, "copy": copy})

    def terminate(self, status: str, end_time: int | None = None) -> None:
        self.submit({"op": "terminate", "status": status, "end_time": end_time or int(time.time() * 1000)})

    def submit(self, op: dict[str, Any]) -> None:
        """Send `op` now if nothing is queued before it; else (or if the store is unreachable) queue it."""
        with self._lock:
            self._submit(op)

    def _submit(self, op: dict[str, Any]) -> None:
        if not self.queue:
            try:
                self._send(op)
                return
            except Exception as e:
                if not is_outage(e):
                    raise
                self._failed(e)
        self._enqueue(op)
        if threading.current_thread() is self._owner:
            self.drain()

    # -- sending ---------------------------------------------------------------------------
    def drain(self, force: bool = False) -> bool:
        """Send what is queued, in order, until the store fails again; True when nothing is left.

        Without `force` nothing is tried until `retry_s` after the last failure, so an outage costs
        training one failed request per `retry_s`, not one per step. A write the store rejects is
        dropped from the queue and raised.
        """
        with self._lock:
            return self._drain(force)

    def _drain(self, force: bool) -> bool:
        if not force and time.monotonic() < self._next_try:
            return not self.queue
        while self.queue:
            n, op = self._merged()
            try:
                self._send(op)
            except Exception as e:
                if is_outage(e):
                    self._failed(e)
                    return False
                if n > 1:  # one of the merged writes was refused: send them one by one to find which
                    self._unmerged = n
                    continue
                self._delivered(1)  # refused for good: retrying cannot help
                raise
            self._delivered(n)
        return True

    def flush(self, budget_s: float) -> bool:
        """Drain, waiting out an outage for up to `budget_s`; True when everything arrived."""
        deadline = time.monotonic() + budget_s
        while not self.drain(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.retry_s, left))
        return True

    def _send(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "batch":
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), int(t), int(s)) for k, v, t, s in op["metrics"]],
                                  params=[Param(k, v) for k, v in op["params"]], tags=[RunTag(k, v) for k, v in op["tags"]])
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), op["dir"])
            else:
                self.client.log_artifact(self.run_id, str(path), op["dir"])
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, op["status"], op["end_time"])
        else:
            raise ValueError(f"unknown spool operation {kind!r} in {self.folder}")

    def _merged(self) -> tuple[int, dict[str, Any]]:
        """The next queued write, with the batches right behind it merged into one request (a backlog of
        per-step metrics goes out 1,000 at a time)."""
        first = self.queue[0]
        if first["op"] != "batch" or self._unmerged:
            return 1, first
        metrics, params, tags = list(first["metrics"]), dict(first["params"]), dict(first["tags"])
        n = 1
        for op in self.queue[1:]:
            if op["op"] != "batch":
                break
            p, t = {**params, **dict(op["params"])}, {**tags, **dict(op["tags"])}  # a repeated key: the later value
            if (len(metrics) + len(op["metrics"]) + len(p) + len(t) > MAX_ENTITIES or len(p) > MAX_PARAMS
                    or len(t) > MAX_TAGS):
                break
            metrics += op["metrics"]
            params, tags = p, t
            n += 1
        return n, {"op": "batch", "metrics": metrics, "params": list(params.items()), "tags": list(tags.items())}

    # -- the journal -----------------------------------------------------------------------
    def _enqueue(self, op: dict[str, Any]) -> None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            (self.folder / "meta.json").write_text(json.dumps(
                {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}))
        if op["op"] == "artifact" and op.pop("copy", False):
            src = Path(op["path"])
            dst = self.folder / "files" / str(self._sent + len(self.queue)) / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
            op["path"] = str(dst.resolve())
        op.pop("copy", None)
        with open(self.folder / "journal.jsonl", "a") as f:
            f.write(json.dumps(op) + "\n")
        self.queue.append(op)

    def _delivered(self, n: int) -> None:
        del self.queue[:n]
        self._unmerged = max(self._unmerged - n, 0)
        self._sent += n
        if not self.queue:  # all arrived: the journal and its file copies are done with
            shutil.rmtree(self.folder, ignore_errors=True)
            self._sent = 0
            return
        tmp = self.folder / "sent.tmp"
        tmp.write_text(str(self._sent))
        tmp.replace(self.folder / "sent")

    def _failed(self, e: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_s
        if not self._warned:
            self._warned = True
            msg = str(e).strip().splitlines()
            print(f"warning: tracking store unreachable ({type(e).__name__}: {msg[0][:200] if msg else ''}); "
                  f"run {self.run_id} goes on, its writes are kept in {self.folder} and retried",
                  file=sys.stderr)


class SpooledClient(MlflowClient):
    """An ``MlflowClient`` whose writes to one run go through that run's `Spool`.

    Reads, and writes to other runs, go straight to the store. The writes are MLflow's own
    methods: ``log_text``, ``log_figure``, ``log_image``, ``log_dict`` end in ``log_artifact``
    here, so a project that logs through the Lightning logger's ``experiment`` is buffered too.
    """

    def __init__(self, tracking_uri: str, run_id: str, folder: Path, retry_s: float = 5.0):
        super().__init__(tracking_uri)
        self.spool = Spool(MlflowClient(tracking_uri), run_id, folder, retry_s)

    def _mine(self, run_id: str) -> bool:
        return run_id == self.spool.run_id

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if not self._mine(run_id):
            return super().log_batch(run_id, metrics, params, tags, synchronous=synchronous)
        self.spool.batch(metrics, params, tags)

    def log_metric(self, run_id, key, value, timestamp=None, step=None, synchronous=None, **kw):
        if not self._mine(run_id) or kw:
            return super().log_metric(run_id, key, value, timestamp, step, synchronous=synchronous, **kw)
        self.spool.batch(metrics=[Metric(key, float(value), timestamp or int(time.time() * 1000), step or 0)])

    def log_param(self, run_id, key, value, synchronous=None):
        if not self._mine(run_id):
            return super().log_param(run_id, key, value, synchronous=synchronous)
        self.spool.batch(params=[Param(key, str(value))])
        return value

    def set_tag(self, run_id, key, value, synchronous=None):
        if not self._mine(run_id):
            return super().set_tag(run_id, key, value, synchronous=synchronous)
        self.spool.batch(tags=[RunTag(key, str(value))])

    def log_artifact(self, run_id, local_path, artifact_path=None):
        if not self._mine(run_id):
            return super().log_artifact(run_id, local_path, artifact_path)
        self.spool.artifact(local_path, artifact_path)

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        if not self._mine(run_id):
            return super().log_artifacts(run_id, local_dir, artifact_path)
        self.spool.artifact(local_dir, artifact_path)

    def set_terminated(self, run_id, status=None, end_time=None):
        if not self._mine(run_id):
            return super().set_terminated(run_id, status, end_time)
        self.spool.terminate(status or "FINISHED", end_time)
