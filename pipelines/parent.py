"""A study's parent run: opened with the study's declarations as tags (`pipelines.compare` reads the
table's layout back from them), reopened by ``--resume``, closed with the table, its files and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import matplotlib.pyplot as plt

from pipelines import chart_view, rounds
from pipelines import tracking as trk
from pipelines.compare import StudyTable, study_table
from pipelines.plots import study_plots
from pipelines.tables import render, text_artifact
from pipelines.tracking import ConfigError


@dataclass
class Parent:
    """The study's parent run, and what every child run needs to log under it (sent to workers)."""

    study: Any  # pipelines.study.Study (which imports this file's functions: no import back)
    uri: str
    exp_id: str
    run_id: str
    args: list[str]
    system_metrics: bool
    resumed: bool = False  # an earlier parent reopened (--resume): its finished jobs are not run again

    @property
    def client(self) -> trk.MlflowClient:
        return trk.MlflowClient(self.uri)


def open_parent(study, names: list[str], skipped: dict[str, str], args: Sequence[str],
                tracking_uri: str | None, system_metrics: bool, resume: bool = False) -> Parent:
    """Create the parent run (`resume`: reopen the study's latest); `pipelines.compare` reads the
    table's layout back from its tags."""
    uri = trk.resolve_tracking_uri(tracking_uri)
    client = trk.MlflowClient(uri)
    trk.check_reachable(client, uri)
    exp_id = trk.get_or_create_experiment(client, study.name, uri)
    if resume:
        last = client.search_runs([exp_id], f"tags.`{trk.TAG_ROLE}` = 'parent'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not last:
            raise ConfigError(f"--resume: study '{study.name}' has no earlier run in {uri}; run it without --resume")
        client.update_run(last[0].info.run_id, status="RUNNING")
        return Parent(study, uri, exp_id, last[0].info.run_id, list(args), system_metrics, resumed=True)
    tags = {
        **trk.environment_tags(),
        trk.TAG_STUDY: study.name,
        trk.TAG_ROLE: "parent",
        "practicum.variants": json.dumps(names),
        "practicum.columns": json.dumps(study.columns),
        "practicum.primary_metric": study.primary_metric,
        "practicum.seeds": json.dumps(study.seeds),
        "practicum.report": study.report,
        "practicum.modes": json.dumps(study.modes),
        "practicum.equal_budget": str(study.equal_budget).lower(),
        "practicum.quick": str(study.quick).lower(),
        **({"practicum.baseline": study.baseline} if study.baseline else {}),
        **({"practicum.skipped": json.dumps(skipped)} if skipped else {}),
        **rounds.parent_tags(study),  # margins, claims, the sequential design: the verdicts from MLflow alone
    }
    run_id = client.create_run(exp_id, tags=tags, run_name=study.name).info.run_id
    client.log_text(run_id, trk.redact(study.path.read_text()), "study.yaml")  # e.g. tune.storage's password
    if args:
        client.log_param(run_id, "overrides", trk.redact(" ".join(args)))
    return Parent(study, uri, exp_id, run_id, list(args), system_metrics)


def summarize(parent: Parent, results: list) -> StudyTable:
    """The comparison from MLflow, logged to the parent with its plots; the parent closes with the
    study's status (KILLED when a run was interrupted, FAILED when every run failed)."""
    client, run_id = parent.client, parent.run_id
    try:
        table = study_table(client, client.get_run(run_id))
    except ConfigError:  # a column no run logged: the parent ends, the error names the column
        client.set_terminated(run_id, "FAILED")
        raise
    client.log_text(run_id, table.summary.to_csv(index=False), "comparison.csv")
    client.log_text(run_id, table.runs.to_csv(index=False), "runs.csv")
    client.log_text(run_id, table.differences.to_csv(index=False), "differences.csv")
    client.log_text(run_id, render(table, "markdown"), "comparison.md")
    client.log_text(run_id, text_artifact(table), "comparison.txt")
    rounds.log_verdicts(client, run_id, table)  # means, half-widths, claims: the MLflow UI's view
    for fname, fig in study_plots(client, run_id, parent.study.primary_metric, parent.study.scatter).items():
        client.log_figure(run_id, fig, f"plots/{fname}")
        plt.close(fig)
    chart_view.save(client, parent.exp_id)  # the MLflow UI's charts: training curves first
    status = "FINISHED"
    if any(r.status == "KILLED" for r in results):
        status = "KILLED"
    elif results and all(r.status == "FAILED" for r in results):
        status = "FAILED"
    client.set_terminated(run_id, status)
    return table
