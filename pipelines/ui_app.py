"""The MLflow UI as `practicum ui` serves it: MLflow's own app, plus one page that makes the
model-training view stick past the landing page.

MLflow 3.17's UI chooses between its GenAI and model-training views from the URL's ``workflowType``
parameter, else from the browser's localStorage entry ``mlflow.workflowType_v1`` (written only when a
person flips the sidebar's switch), else GenAI. A link with ``?workflowType=machine_learning`` lands
right, but the next click (a run, Compare) drops the parameter and falls back to GenAI: the sidebar
reads "Evaluations" and models become "Agent versions". ``/practicum/land?to=#/...`` stores the choice
as the switch would, then goes on to the page. Served as MLflow's ``--app-name practicum``.
"""

from __future__ import annotations

import json

from flask import abort, request
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app  # noqa: F401  (the ASGI app uvicorn serves; it wraps flask_app)

from pipelines.tracking import UI_LAND as LAND

# The UI's own key (useLocalStorage({key: "mlflow.workflowType", version: 1}) stores it as KEY_vVERSION);
# tests/pipelines/test_ui_app.py reads it back out of MLflow's JavaScript bundle.
VIEW_KEY, VIEW = "mlflow.workflowType_v1", "machine_learning"

_PAGE = """<!doctype html><meta charset="utf-8"><title>MLflow</title>
<script>
try {{ localStorage.setItem({key}, JSON.stringify({view})); }} catch (e) {{}}
location.replace("../" + {target});  // ../ from /practicum/land: the UI's root, under any static prefix
</script>
<a href={href}>Open MLflow</a>"""


@flask_app.route(LAND)
def land():
    target = request.args.get("to", "#/experiments")
    if not target.startswith("#/"):  # only a page of this UI, never another site
        abort(400, "to= must be a page of this UI, starting with #/")
    page = _PAGE.format(key=json.dumps(VIEW_KEY), view=json.dumps(VIEW), target=json.dumps(target),
                        href=json.dumps("../" + target))
    return page, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}
