"""Where a study's runs run: here, one after another; on N local worker processes; or as Ray tasks.

Every executor hands back `concurrent.futures.Future`s, so the study's loop (`pipelines.jobs`) is the
same for all three. The pools are libraries' own: `ProcessPoolExecutor` with a spawn context
(fresh interpreters: no forked CUDA or thread state), and Ray, whose ``ObjectRef.future()`` is a
Future too. A run is a pure function of its job (`work`): any process that can reach the tracking
store can run it, and a run that died is taken up again by `work` itself (`pipelines.jobs.run_job`).

- ``--workers N``: N processes on this machine, each with ``cores // N`` threads (so N workers never
  oversubscribe the CPU) and, where there are GPUs, its own (``CUDA_VISIBLE_DEVICES``). A worker
  killed outright breaks the pool: the pool is started again and the runs it held are resubmitted.
- ``--ray [ADDRESS]``: each run a Ray task declaring ``num_cpus``/``num_gpus``, on the cluster at
  ADDRESS (or $RAY_ADDRESS), else on a local Ray instance; Ray retries a task whose worker died.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import socket
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

# What a lost worker looks like to the study's loop: the run is resubmitted (`pipelines.jobs`).
LOST = (BrokenProcessPool,)


@dataclass
class Slot:
    """What one run may use: CPU threads and GPUs (Ray's num_cpus and num_gpus)."""

    num_cpus: int = 1
    num_gpus: float = 0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def work(fn, args: tuple, threads: int):
    """Run `fn(*args)` in a worker with `threads` CPU threads, tagging the run with the worker's name."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    os.environ["PRACTICUM_WORKER"] = f"{socket.gethostname()}:{os.getpid()}"
    from pipelines import console

    console.configure(verbose=False)
    # The study passes a SIGTERM on to its workers (`LocalPool.interrupt`). During a fit Lightning's own
    # handler stops the run at the end of a step; before and after it (building the model, logging
    # it) this one does, so the run ends KILLED in MLflow at whatever point the signal came.
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        return fn(*args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(signum, _frame):
    if signal.getsignal(signal.SIGTERM) is not _stopped:
        return  # a fit is on: Lightning's handler (which calls this one too) stops it at the end of a step
    raise SystemExit(f"stopped by {signal.Signals(signum).name}")


class Serial:
    """Runs each job at once, in this process (the default)."""

    slots, name = 1, "serial"

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  (the loop reads it from the future)
            if isinstance(e, KeyboardInterrupt):
                raise
            f.set_exception(e)
        return f

    def restart(self) -> None:
        pass

    def interrupt(self, grace_s: float = 60.0) -> None:
        pass  # the run in flight is this process's: the signal reached it already

    def close(self) -> None:
        pass


def _init_worker(threads: int, devices) -> None:
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if devices is not None:  # one GPU per worker, taken from the queue the pool was given
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())


class LocalPool:
    """N worker processes on this machine (spawned), each with its share of the cores and a GPU where
    there are GPUs."""

    name = "workers"

    def __init__(self, n: int):
        self.slots = n
        self.threads = max(1, cores() // n)
        self._ctx = multiprocessing.get_context("spawn")
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        devices = None
        if n_gpu := gpus():
            devices = self._ctx.Manager().Queue()
            for i in range(self.slots):
                devices.put(i % n_gpu)
        return ProcessPoolExecutor(self.slots, mp_context=self._ctx, initializer=_init_worker,
                                   initargs=(self.threads, devices))

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(work, fn, args, self.threads)

    def restart(self) -> None:
        """A worker died (SIGKILL, the OOM killer) and took the pool with it: start a fresh one."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._start()

    def interrupt(self, grace_s: float = 60.0) -> None:
        """The study was stopped by a signal to its own process (SIGTERM from `kill`, `timeout`, a
        scheduler), which its workers did not get, as they do a terminal's Ctrl-C: pass it on. A run in
        flight ends KILLED with what it logged (Lightning turns SIGTERM into an exception the run catches);
        a worker still alive after `grace_s` is killed, so none outlives the study."""
        import psutil

        procs = []
        for pid in list(getattr(self._pool, "_processes", None) or {}):
            try:
                procs.append(psutil.Process(pid))
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)  # each exits once its run has ended KILLED
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayPool:
    """Each job a Ray task with declared resources, on the cluster at `address` or a local instance.

    Args:
        address: A Ray cluster (``ray://host:10001`` or ``host:6379``); None: $RAY_ADDRESS, else a new
            local instance of `num_cpus` CPUs.
        slot: What each task declares.
        num_cpus: The local instance's CPUs (None: all of this machine's).
    """

    name = "ray"

    def __init__(self, address: str | None, slot: Slot, num_cpus: int | None = None):
        import ray

        self.ray, self.slot = ray, slot
        address = address or os.environ.get("RAY_ADDRESS") or None
        env = {"PRACTICUM_LOG_MODEL": os.environ.get("PRACTICUM_LOG_MODEL", "1")}
        if not address:  # a local instance: its workers import what this process imports, as spawned ones do
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        ray.init(address=address, num_cpus=None if address else (num_cpus or cores()), include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env})
        total = ray.cluster_resources()
        self.slots = max(1, int(total.get("CPU", 1) // max(slot.num_cpus, 1)))
        if slot.num_gpus:
            self.slots = min(self.slots, max(1, int(total.get("GPU", 0) // slot.num_gpus)))
        # max_retries: a task whose worker process died runs once more; `work` resumes its run.
        self._remote = ray.remote(work).options(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_retries=1)

    def submit(self, fn, *args) -> Future:
        return self._remote.remote(fn, args, self.slot.num_cpus).future()

    def restart(self) -> None:
        pass

    def interrupt(self, grace_s: float = 60.0) -> None:
        pass  # `close` shuts a local instance down with its workers; a cluster's tasks are the cluster's

    def close(self) -> None:
        self.ray.shutdown()


def make_executor(workers: int | None = None, ray: str | bool | None = None, slot: Slot | None = None):
    """Serial by default; `workers` local processes; `ray` True (local instance, or $RAY_ADDRESS) or an
    address."""
    from pipelines.tracking import ConfigError

    if workers and ray:
        raise ConfigError("give --workers N or --ray [ADDRESS], not both")
    if ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--ray needs Ray, an optional extra: pip install -e '.[ray]'") from None
        return RayPool(ray if isinstance(ray, str) else None, slot or Slot())
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    return LocalPool(workers) if workers and workers > 1 else Serial()
