"""A study's runs under its parent run: its stages first, then every (variant, seed) pair as a job.

`run_stages` runs (or reuses) the stages; `plan_jobs` resolves each variant's config (tuning it
first where the study tunes); `run_jobs` hands the jobs to an executor (`pipelines.executor`: this
process, local workers or Ray) and draws the study's progress line.

A job is found again by its tag ``practicum.job`` under the parent: `run_job` resumes the run of a
job whose worker died (from its last checkpoint, into the same MLflow run), and ``--resume`` runs
only the jobs without a finished run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pipelines import console
from pipelines import tracking as trk
from pipelines.compare import reported
from pipelines.config import to_cli_args
from pipelines.console import summary_line
from pipelines.executor import LOST, Serial
from pipelines.tracking import ConfigError, StageFailed


def run_stages(parent, executor=None) -> dict[str, str]:
    """Run (or reuse) every stage; returns {stage name: run id} and records it on the parent."""
    from pipelines.run import run_experiment

    study, client, executor = parent.study, parent.client, executor or Serial()
    runs: dict[str, str] = {}
    for name in study.stages:
        config, sargs, digest = study.stage_config(name, parent.args, runs)
        found = client.search_runs(
            [parent.exp_id], f"tags.`{trk.TAG_ROLE}` = 'stage' and tags.`practicum.stage_digest` = '{digest}' "
                             "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            runs[name] = found[0].info.run_id
            tqdm.write(f"[{study.name}] stage {name}: reusing run {runs[name]}")
            continue
        tags = {trk.TAG_STUDY: study.name, trk.TAG_ROLE: "stage", "practicum.stage": name,
                "practicum.stage_digest": digest}
        res = executor.submit(functools.partial(
            run_experiment, config, sargs, parent.uri, experiment=study.name, run_name=f"stage-{name}",
            parent_run_id=parent.run_id, tags=tags, system_metrics=parent.system_metrics)).result()
        tqdm.write(f"[{study.name}] stage {name}: {res.status}")
        if res.status != "FINISHED":
            client.set_terminated(parent.run_id, "FAILED")
            raise StageFailed(f"study '{study.name}': stage '{name}' ended {res.status} ({res.error}); "
                              f"its run is {res.run_id}")
        runs[name] = res.run_id
    if runs:
        client.set_tag(parent.run_id, "practicum.stages", json.dumps(runs))
    return runs


@dataclass
class Job:
    """One run of a study: a variant at a seed, with everything a process needs to run it.

    `error` is set when the variant could not even be configured (a missing base config, a failed
    search): the job is then recorded as a FAILED child without running.
    """

    variant: str
    seed: int | None
    label: str
    config: Path | None
    args: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None


MAX_TRIES = 3  # a job whose worker died is resubmitted, resuming its run, up to this many starts


def plan_jobs(parent, names: list[str], stage_runs: dict[str, str], executor=None, bar=None, seeds=None) -> list[Job]:
    """The study's jobs in order (variant by variant, seed by seed: `seeds`, default the study's); tunes
    each variant first where the study has a ``tune:`` block, so its seeded runs carry the best params."""
    study, executor = parent.study, executor or Serial()
    jobs = []
    for name in names:
        tags = {trk.TAG_STUDY: study.name, trk.TAG_VARIANT: name, trk.TAG_ROLE: "variant"}
        try:
            config, vargs = study.variant_config(name, stage_runs)
            vargs = [*vargs, *parent.args]
            if study.tune_for(name) is not None:  # the variant's search, once, before its seeds
                best = tune(parent, name, config, vargs, executor, bar)
                if best:
                    tags["practicum.tuned"] = json.dumps(best)
                    vargs = [*vargs, *to_cli_args(best)]
            error = None
        except (ConfigError, trk.TrackingError) as e:
            config, vargs, error = None, [], str(e)
        for seed in study.seeds if seeds is None else seeds:
            label = name if seed is None else f"{name} seed={seed}"
            jobs.append(Job(name, seed, label, config, [*vargs, *study.seed_args(seed)],
                            {**tags, "practicum.job": label}, error))
    return jobs


def tune(parent, name: str, config: Path, vargs: list[str], executor, bar) -> dict:
    """The variant's search: as many tuning workers as the executor has slots (the Optuna storage
    shares the budget between them), then the best params, read from the storage."""
    from pipelines.callbacks import ProgressLine
    from pipelines.tune import tune_variant

    study, spec = parent.study, parent.study.tune_for(name)
    task = functools.partial(tune_variant, study.name, name, config, vargs, spec, parent.uri,
                             parent_run_id=parent.run_id, experiment=study.name, system_metrics=parent.system_metrics)
    if not isinstance(executor, Serial):
        worker_task = functools.partial(task, record=False)  # the best is recorded once, below
        for f in [executor.submit(worker_task) for _ in range(min(executor.slots, spec.n_trials))]:
            f.result()
    # here: the trials themselves (serial), or none left, and the final best over every worker's trials
    tuned = task(progress=ProgressLine(bar, f"{name} tuning", spec.metric) if bar else None)
    tqdm.write(f"[{study.name}] {name}: tuned {tuned['best_params']} "
               f"({spec.metric} {tuned['best_value']:.4g}, {tuned['n_trials']} trials)")
    return tuned["best_params"]


def job_run(parent, label: str):
    """The run of a job under the parent (the latest), or None."""
    runs = parent.client.search_runs([parent.exp_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}' and "
                                     f"tags.`practicum.job` = '{label}'", order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def run_job(job: Job, parent, callbacks=()):
    """One job as one pipeline run, a child of the parent (a job that never started: a FAILED child).

    A job that already has a run (its worker died, or the study was interrupted) continues that run
    from its last checkpoint; one that died before its first checkpoint starts again, its dead run
    deleted. A finished run is returned as it is.
    """
    from pipelines.checkpoint import find_resume_point
    from pipelines.run import RunResult, run_experiment

    args, client = list(job.args), parent.client
    tags = {**job.tags, **({"practicum.worker": os.environ["PRACTICUM_WORKER"]} if "PRACTICUM_WORKER" in os.environ
                           else {})}
    try:
        if job.error:
            raise ConfigError(job.error)
        if prior := job_run(parent, job.label):
            if prior.info.status in ("FINISHED", "FAILED"):
                return RunResult(prior.info.run_id, prior.info.status, dict(prior.data.metrics))
            try:
                find_resume_point(prior.info.run_id, parent.uri, None)
                args.append(f"--resume={prior.info.run_id}")
            except ConfigError:  # no checkpoint yet: nothing to continue from
                client.delete_run(prior.info.run_id)
        return run_experiment(job.config, args, parent.uri, experiment=parent.study.name, run_name=job.label,
                              parent_run_id=parent.run_id, tags=tags, system_metrics=parent.system_metrics,
                              callbacks=callbacks, progress_bar=False)
    except (ConfigError, trk.TrackingError) as e:
        # The run never started: record it as a FAILED child so the table shows it.
        run = client.create_run(parent.exp_id, run_name=job.label, tags={
            **tags, "mlflow.parentRunId": parent.run_id, "practicum.error": str(e)[:5000],
            **({"practicum.seed": str(job.seed)} if job.seed is not None else {})})
        client.set_terminated(run.info.run_id, "FAILED")
        return RunResult(run.info.run_id, "FAILED", error=str(e))


def run_jobs(parent, names: list[str], stage_runs: dict[str, str], executor=None, seeds=None) -> list:
    """Run the study's jobs (`seeds`: these seeds only) on `executor` (default: here, one after
    another); returns their results.

    A Ctrl-C stops the study (its runs end KILLED); a job whose worker died is resubmitted (`run_job`
    resumes it) up to MAX_TRIES starts, then recorded FAILED with the reason.
    """
    from pipelines.callbacks import ProgressLine
    from pipelines.run import RunResult

    study, executor = parent.study, executor or Serial()
    metric = reported(study.primary_metric, study.report)
    # One line for the whole study (runs done, elapsed, remaining; the runs in flight, each with its
    # worker, step or metric), and one line per finished run above it.
    seeds = study.seeds if seeds is None else seeds
    bar = console.progress(len(names) * len(seeds), study.name)  # plain lines when stdout is no terminal
    jobs = plan_jobs(parent, names, stage_runs, executor, bar, seeds)
    done = {j.label for j in jobs if parent.resumed and (r := job_run(parent, j.label))
            and r.info.status in ("FINISHED", "FAILED")}
    bar.update(len(done))
    pending, inflight, tries, results = deque(j for j in jobs if j.label not in done), {}, Counter(), []
    serial = isinstance(executor, Serial)
    try:
        while pending or inflight:
            while pending and len(inflight) < executor.slots:
                job = pending.popleft()
                tries[job.label] += 1
                callbacks = [ProgressLine(bar, job.label, study.primary_metric)] if serial else []
                console.started(bar, job.label)
                inflight[executor.submit(run_job, job, parent, callbacks)] = (job, time.monotonic())
            finished, _ = wait(inflight, timeout=2.0, return_when=FIRST_COMPLETED)
            if not finished:
                show_in_flight(parent, bar, metric)
                continue
            for f in finished:
                job, started = inflight.pop(f)
                try:
                    res = f.result()
                except LOST:  # a worker died and broke the pool: every run it held goes back in the queue
                    lost = [job, *(j for j, _ in inflight.values())]
                    inflight.clear()
                    executor.restart()
                    for j in reversed(lost):
                        if tries[j.label] < MAX_TRIES:
                            pending.appendleft(j)
                        else:
                            results.append(give_up(parent, j, f"its worker died {tries[j.label]} times "
                                                              "(killed: SIGKILL or out of memory)"))
                    break
                except Exception as e:  # noqa: BLE001  (Ray: the task's worker died again after its retry)
                    res = give_up(parent, job, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                results.append(res)
                bar.update(1)
                bar.write(f"[{study.name}] " + summary_line(job.label, res, metric, time.monotonic() - started))
                if res.status == "KILLED" and serial:
                    raise KeyboardInterrupt
    except KeyboardInterrupt as e:  # Ctrl-C: the workers got it too; their runs end KILLED (--resume continues them)
        if isinstance(e, Stopped):  # a signal to this process alone: the workers did not get it
            bar.write(f"[{study.name}] {e}: stopping the runs in flight; the same command with --resume "
                      "continues them from their checkpoints")
            executor.interrupt()
        results.append(RunResult(None, "KILLED", error="interrupted"))
    finally:
        bar.close()
    return results


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP to the study's process: it stops as Ctrl-C stops it."""


@contextlib.contextmanager
def stop_signals_interrupt(executor):
    """While `executor`'s workers run the study (stages, tuning, jobs), SIGTERM and SIGHUP (`kill`,
    `timeout`, a scheduler, a closed terminal) raise `Stopped` here, and the workers are stopped too,
    instead of this process ending at once and leaving them orphaned (PPID 1) with their runs RUNNING
    in MLflow. Serially the run in flight is this process's, and Lightning's own SIGTERM handler ends
    it KILLED, so nothing is installed."""
    if isinstance(executor, Serial) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except Stopped:  # stopped outside the jobs' loop (a stage, tuning), which stops its own
        executor.interrupt()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def give_up(parent, job: Job, why: str):
    """The job's run (or a new child) ends FAILED with `why`."""
    from pipelines.run import RunResult

    client = parent.client
    run = job_run(parent, job.label)
    run_id = run.info.run_id if run else client.create_run(parent.exp_id, run_name=job.label, tags={
        **job.tags, "mlflow.parentRunId": parent.run_id}).info.run_id
    client.set_tag(run_id, "practicum.error", why)
    client.set_terminated(run_id, "FAILED")
    return RunResult(run_id, "FAILED", error=why)


def show_in_flight(parent, bar, metric: str) -> None:
    """The progress line's postfix: every run in flight, by worker, with its latest metric."""
    runs = parent.client.search_runs([parent.exp_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}' and "
                                     "attributes.status = 'RUNNING'")
    shown = []
    for r in runs:
        worker = r.data.tags.get("practicum.worker", "here").rsplit(":", 1)[-1]
        value = r.data.metrics.get(metric, r.data.metrics.get("train/loss"))
        shown.append(f"[{worker}] {r.info.run_name}" + (f" {value:.4g}" if value is not None else ""))
    if shown:
        bar.set_postfix_str(" | ".join(sorted(shown)), refresh=True)
