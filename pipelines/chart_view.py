"""The chart layout Practicum saves for a study in the MLflow UI: the training curves come first.

MLflow's runs charts group metrics into sections by key prefix and sort the sections by name, so
`budget/`, `disk/`, `finetune/` and `gen/` sit above `train/` and `val/`. Metric keys stay as they are;
instead the study's experiment gets a saved view, the UI's own mechanism for a prepared layout. In
MLflow 3.17 a view is the experiment tag ``mlflow.sharedViewState.<key>``: a JSON envelope
``{name, createdAt, updatedAt, state}`` ("Save as new view" in the runs page writes the same; older
share links held the bare state), whose ``state`` is the page's UI state as JSON, optionally
``deflate;`` + base64 of its zlib stream. ``?viewStateShareKey=<key>`` in the runs page's URL loads it
(useSharedExperimentViewState); ``tracking.runs_url`` adds it where the tag exists.

The state holds the chart cards and sections as the UI's ``getBaseChartAndSectionConfigs`` builds
them, in our order, with ``isAccordionReordered``: without it the UI sorts the sections by name again.
Metrics that appear later are added by the UI itself, at the end. The runs are grouped by variant.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import zlib
from typing import Any

from mlflow.exceptions import MlflowException

from pipelines import tracking as trk

log = logging.getLogger(__name__)

NAME = "Practicum: training curves first"
FIRST = ("train", "val", "test")  # these sections lead, in this order (a section is a key's prefix)
MODEL, SYSTEM = "Model metrics", "System metrics"  # the UI's sections for unprefixed and system/ keys
MAX_TAG = 20_000  # MLflow's limit on an experiment tag's value (and the UI's on a saved view)


def section_of(key: str) -> str:
    """The chart section MLflow's UI puts a metric in (``RunsChartsCardConfig.extractChartSectionName``)."""
    prefix = key.rsplit("/", 1)[0] if "/" in key else ""
    return MODEL if prefix == "" else SYSTEM if prefix == "system" else prefix


def _rank(section: str) -> tuple[int, str]:
    if section in FIRST:  # nested ones (a parent's `test/loss/VARIANT` verdict values) sort with the rest
        return FIRST.index(section), section
    return {MODEL: 4, SYSTEM: 5}.get(section, 3), section


def _card(key: str, line: bool, section_uuid: str) -> dict[str, Any]:
    """One chart as the UI's RunsChartsLineCardConfig / RunsChartsBarCardConfig serialises it."""
    card = {"uuid": f"practicum-chart-{key}", "type": "LINE" if line else "BAR", "runsCountToCompare": 10,
            "metricSectionId": section_uuid, "deleted": False, "isGenerated": True, "metricKey": key,
            "displayName": key.rsplit("/", 1)[-1]}
    if line:
        card.update(lineSmoothness=0, xAxisScaleType="linear", scaleType="linear", range={}, xAxisKey="step",
                    selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False,
                    useGlobalXaxisKey=True, useGlobalLineSmoothing=True)
    if section_of(key) == SYSTEM:  # as the UI draws system metrics: against wall time
        card.update(xAxisKey="time", useGlobalXaxisKey=False)
    return card


def chart_state(last_steps: dict[str, int]) -> dict[str, Any]:
    """The UI state for metrics ``{key: the largest step any run logged it at}``: sections train, val,
    test, then the others by name, then Model and System metrics; a line chart where a run logged the
    key at step 1 or later (the UI's own rule), else a bar per run."""
    sections = sorted({section_of(k) for k in last_steps} | {MODEL, SYSTEM}, key=_rank)
    uuid = {s: f"practicum-section-{s}" for s in sections}
    return {
        "compareRunCharts": [_card(k, last_steps[k] >= 1, uuid[section_of(k)])
                             for k in sorted(last_steps, key=lambda k: (_rank(section_of(k)), k))],
        "compareRunSections": [{"uuid": uuid[s], "name": s, "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": True} for s in sections],
        "isAccordionReordered": True,
        # a study's seeded runs sit under its collapsed parent, where charts do not look: grouped by
        # variant, the table and the charts show each variant (its mean over seeds; trials carry no variant)
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": trk.TAG_VARIANT}]},
    }


def encode(state: dict[str, Any], created_ms: int | None = None) -> str:
    """The tag value: the saved-view envelope around the deflated state."""
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state, separators=(",", ":")).encode())).decode()
    now = int(time.time() * 1000)
    return json.dumps({"name": NAME, "createdAt": created_ms or now, "updatedAt": now, "state": packed})


def decode(value: str) -> dict[str, Any]:
    """The state inside a tag value, read as the UI reads it (envelope or bare, deflated or not)."""
    try:
        value = json.loads(value)["state"]
    except (ValueError, KeyError, TypeError):
        pass
    if value.startswith("deflate;"):
        value = zlib.decompress(base64.b64decode(value[len("deflate;"):])).decode()
    return json.loads(value)


def save(client: trk.MlflowClient, experiment_id: str) -> None:
    """Write the experiment's chart view from the metrics its runs logged (a study calls it as its
    parent run closes; a re-run rewrites it, keeping when it was first made)."""
    last_steps: dict[str, int] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            for m in run.data.to_proto().metrics:  # the latest value of each key, with its step
                last_steps[m.key] = max(m.step, last_steps.get(m.key, 0))
        token = page.token
        if not token:
            break
    tag = trk.SHARED_VIEW_TAG + trk.CHART_VIEW
    try:
        created = json.loads(client.get_experiment(experiment_id).tags.get(tag, "{}")).get("createdAt")
    except (ValueError, AttributeError):  # a bare state, as an old share link wrote it
        created = None
    state = chart_state(last_steps)
    value = encode(state, created)
    if len(value) > MAX_TAG:  # hundreds of metrics: keep the section order, let the UI make the charts
        value = encode({**state, "compareRunCharts": []}, created)
    try:
        client.set_experiment_tag(experiment_id, tag, value)
    except MlflowException as e:  # a server that refuses experiment tags: the study's results still stand
        log.warning("the MLflow UI's chart view was not saved: %s", str(e).splitlines()[0][:200])
