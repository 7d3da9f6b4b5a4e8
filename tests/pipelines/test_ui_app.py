"""The page that keeps MLflow's UI in the model-training view after the first click."""

import json
import re
from pathlib import Path

import mlflow
import pytest

from pipelines import ui_app


def _bundle(pattern: str = "main.*.js") -> str:
    """The installed MLflow UI's JavaScript, minified."""
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(errors="ignore") for p in bundle.glob(pattern))


def test_the_view_key_is_the_one_mlflows_ui_reads():
    """If MLflow renames the entry its sidebar switch writes, the landing page would write a dead key."""
    text = _bundle()
    found = re.search(r'key:"(mlflow\.workflowType)",version:(\d+)', text)
    assert found, "MLflow's UI no longer keeps the workflow type in localStorage under this name"
    assert ui_app.VIEW_KEY == f"{found[1]}_v{found[2]}"
    assert 'MACHINE_LEARNING="machine_learning"' in text


def test_land_stores_the_view_and_goes_on_to_the_page():
    client = ui_app.flask_app.test_client()
    r = client.get(ui_app.LAND, query_string={"to": "#/experiments/3/runs?workflowType=machine_learning"})
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    body = r.get_data(as_text=True)
    assert 'localStorage.setItem("mlflow.workflowType_v1", JSON.stringify("machine_learning"))' in body
    assert 'location.replace("../" + "#/experiments/3/runs?workflowType=machine_learning")' in body


@pytest.mark.parametrize("target", ["https://elsewhere.example/", "//elsewhere.example", "javascript:alert(1)"])
def test_land_goes_nowhere_but_this_ui(target):
    assert ui_app.flask_app.test_client().get(ui_app.LAND, query_string={"to": target}).status_code == 400


def test_practicum_ui_lands_through_the_page_that_keeps_the_view():
    from urllib.parse import parse_qs, urlsplit

    from pipelines.cli import sticky_view

    base = "http://127.0.0.1:5000"
    url = sticky_view(base, f"{base}/#/experiments/4/runs?workflowType=machine_learning")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == base + ui_app.LAND
    assert parse_qs(parts.query)["to"] == ["#/experiments/4/runs?workflowType=machine_learning"]
    r = ui_app.flask_app.test_client().get(f"{parts.path}?{parts.query}")
    assert r.status_code == 200 and "#/experiments/4/runs?workflowType=machine_learning" in r.get_data(as_text=True)


def test_the_chart_view_is_one_mlflows_ui_loads():
    """The study's saved chart view (pipelines.chart_view) in the form the installed UI reads: the URL
    parameter and tag prefix, the saved-view envelope, and the UI-state keys it restores from a view."""
    from pipelines import chart_view
    from pipelines import tracking as trk

    main, chunks = _bundle(), _bundle("*.chunk.js")
    assert f'"{"viewStateShareKey"}"' in main and f'"{trk.SHARED_VIEW_TAG}"' in main
    assert 'Invalid saved-view envelope' in chunks and '"deflate;"' in main  # the envelope, the compression
    restored = json.loads(re.search(r'=(\["selectedColumns","columnOrder"[^\]]*\])', main)[1])  # ExperimentPageUIState keys
    state = chart_view.chart_state({"train/loss": 9, "test/loss": 0, "system/cpu_utilization_percentage": 3})
    assert set(state) <= set(restored), set(state) - set(restored)
    assert state["isAccordionReordered"] is True  # else the UI sorts the sections by name again
    envelope = json.loads(chart_view.encode(state))
    assert {"name", "createdAt", "updatedAt", "state"} <= set(envelope) and isinstance(envelope["createdAt"], int)
    assert chart_view.decode(chart_view.encode(state)) == state
    assert chart_view.decode(json.dumps(state)) == state  # a bare state, as old share links wrote it
