"""A study's runs under its parent run: its stages first, then every (variant, seed) pair as a job.

`run_stages` runs (or reuses) the stages; `plan_jobs` resolves each variant's config (tuning it
first where the study tunes); `run_jobs` runs the jobs one after another and draws the study's
progress line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pipelines import tracking as trk
from pipelines.compare import reported
from pipelines.config import to_cli_args
from pipelines.console import summary_line
from pipelines.tracking import ConfigError, StageFailed


def run_stages(parent) -> dict[str, str]:
    """Run (or reuse) every stage; returns {stage name: run id} and records it on the parent."""
    from pipelines.run import run_experiment

    study, client = parent.study, parent.client
    runs: dict[str, str] = {}
    for name in study.stages:
        config, sargs, digest = study.stage_config(name, parent.args)
        found = client.search_runs(
            [parent.exp_id], f"tags.`{trk.TAG_ROLE}` = 'stage' and tags.`practicum.stage_digest` = '{digest}' "
                             "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            runs[name] = found[0].info.run_id
            tqdm.write(f"[{study.name}] stage {name}: reusing run {runs[name]}")
            continue
        tags = {trk.TAG_STUDY: study.name, trk.TAG_ROLE: "stage", "practicum.stage": name,
                "practicum.stage_digest": digest}
        res = run_experiment(config, sargs, parent.uri, experiment=study.name, run_name=f"stage-{name}",
                             parent_run_id=parent.run_id, tags=tags, system_metrics=parent.system_metrics)
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


def plan_jobs(parent, names: list[str], stage_runs: dict[str, str], bar=None, seeds=None) -> list[Job]:
    """The study's jobs in order (variant by variant, seed by seed: `seeds`, default the study's); tunes
    each variant first where the study has a ``tune:`` block, so its seeded runs carry the best params."""
    from pipelines.callbacks import ProgressLine
    from pipelines.tune import tune_variant

    study = parent.study
    jobs = []
    for name in names:
        tags = {trk.TAG_STUDY: study.name, trk.TAG_VARIANT: name, trk.TAG_ROLE: "variant"}
        try:
            config, vargs = study.variant_config(name, stage_runs)
            vargs = [*vargs, *parent.args]
            if study.tune is not None:  # the variant's search, once, before its seeds
                tuned = tune_variant(study.name, name, config, vargs, study.tune, parent.uri,
                                     parent_run_id=parent.run_id, experiment=study.name,
                                     system_metrics=parent.system_metrics,
                                     progress=ProgressLine(bar, f"{name} tuning", study.tune.metric) if bar else None)
                tqdm.write(f"[{study.name}] {name}: tuned {tuned['best_params']} "
                           f"({study.tune.metric} {tuned['best_value']:.4g}, {tuned['n_trials']} trials)")
                if tuned["best_params"]:
                    tags["practicum.tuned"] = json.dumps(tuned["best_params"])
                    vargs = [*vargs, *to_cli_args(tuned["best_params"])]
            error = None
        except (ConfigError, trk.TrackingError) as e:
            config, vargs, error = None, [], str(e)
        for seed in study.seeds if seeds is None else seeds:
            label = name if seed is None else f"{name} seed={seed}"
            jobs.append(Job(name, seed, label, config, [*vargs, *study.seed_args(seed)], tags, error))
    return jobs


def run_job(job: Job, parent, callbacks=()):
    """One job as one pipeline run, a child of the parent (a job that never started: a FAILED child)."""
    from pipelines.run import RunResult, run_experiment

    try:
        if job.error:
            raise ConfigError(job.error)
        return run_experiment(job.config, job.args, parent.uri, experiment=parent.study.name, run_name=job.label,
                              parent_run_id=parent.run_id, tags=job.tags, system_metrics=parent.system_metrics,
                              callbacks=callbacks, progress_bar=False)
    except (ConfigError, trk.TrackingError) as e:
        # The run never started: record it as a FAILED child so the table shows it.
        run = parent.client.create_run(parent.exp_id, run_name=job.label, tags={
            **job.tags, "mlflow.parentRunId": parent.run_id, "practicum.error": str(e)[:5000],
            **({"practicum.seed": str(job.seed)} if job.seed is not None else {})})
        parent.client.set_terminated(run.info.run_id, "FAILED")
        return RunResult(run.info.run_id, "FAILED", error=str(e))


def run_jobs(parent, names: list[str], stage_runs: dict[str, str], seeds=None) -> list:
    """Run the study's jobs (`seeds`: these seeds only) one after another; stops at an interrupted
    (KILLED) run."""
    from pipelines.callbacks import ProgressLine

    study = parent.study
    metric = reported(study.primary_metric, study.report)
    # One line for the whole study (runs done, elapsed, remaining; the running variant, its step and
    # metric), and one line per finished run above it.
    seeds = study.seeds if seeds is None else seeds
    bar = tqdm(total=len(names) * len(seeds), desc=study.name, unit="run", position=0, leave=False,
               dynamic_ncols=True)
    results = []
    for job in plan_jobs(parent, names, stage_runs, bar, seeds):
        bar.set_postfix_str(job.label)
        started = time.monotonic()
        res = run_job(job, parent, [ProgressLine(bar, job.label, study.primary_metric)])
        results.append(res)
        bar.update(1)
        bar.write(f"[{study.name}] " + summary_line(job.label, res, metric, time.monotonic() - started))
        if res.status == "KILLED":
            break
    bar.close()
    return results
