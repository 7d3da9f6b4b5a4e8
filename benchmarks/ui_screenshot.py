"""Open `practicum ui`'s URL in headless Chromium, check it lands on the study's runs, keep a screenshot.

    python benchmarks/ui_screenshot.py [--tracking_uri URI] [--study NAME] [--out docs/images/ui-runs.png]

Starts `practicum ui` on a free port for the store (default: mlruns/ after `make demo`), takes the
URL it prints, and loads it in Chromium through Playwright (Debian's `chromium`, or $CHROMIUM; Playwright
cannot download browsers offline). Exits 1, after saving the screenshots anyway, when the page is not
the experiment's runs table in the model-training view or does not list the study's parent run; when a
run page or the compare page (reached without the URL's workflowType) falls back to the GenAI view; or
when grouping the runs table by variant (its "Group by" menu, clicked) puts in a variant's group other
runs than its seeded ones (a tuning trial, a stage); or when the runs page's chart view (the study's
saved view, pipelines.chart_view) does not open on a train/ or val/ section. Screenshots: OUT (the
runs table), OUT-grouped (grouped by variant), OUT-charts (the chart view), OUT-run, OUT-run-charts (its Model metrics tab: end-of-run values as bars),
OUT-run-curves (the same tab searched for "loss": the curves as lines), OUT-compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote


def ml_view(page) -> bool:
    """The sidebar of the model-training view lists the Model registry; the GenAI view's does not, and
    shows Traces and Evaluations instead."""
    time.sleep(1)
    registry = page.get_by_text("Model registry", exact=True).count() > 0
    genai = page.get_by_text("Evaluations", exact=True).count() > 0 or page.get_by_text("Agent versions").count() > 0
    return registry and not genai


def group_by_variant(page, out: str) -> dict[str, int]:
    """The runs table grouped by the variant tag: a study's saved view lands grouped, else group it through
    the "Group by" menu, as a user would; keep a screenshot (OUT-grouped); return each group's run count
    as the table shows it."""
    if not page.get_by_role("button", name="Group by: practicum.variant").count():
        page.get_by_role("button", name="Group by").first.click()
        page.get_by_role("menuitemcheckbox", name="practicum.variant", exact=True).click()
        page.keyboard.press("Escape")
    time.sleep(2)
    page.screenshot(path=_beside(out, "grouped"))
    rows = [r.replace("\n", " | ") for r in page.get_by_role("row").all_inner_texts()]
    groups = {m.group(1): int(m.group(2)) for r in rows if (m := re.search(r"Group: (.+?) \| (\d+)", r))}
    return groups


def chart_sections(page, out: str) -> list[tuple[str, int]]:
    """Switch the runs page to its chart view, as a user would (the view toggle beside the search box);
    keep a screenshot (OUT-charts); return its sections top to bottom with their chart counts."""
    page.locator("label:has(input[value=CHART])").click()
    header = re.compile(r"^(.+)\n\((\d+)\)\nAdd chart$")
    page.get_by_role("button", name="Add chart").first.wait_for(timeout=60_000)
    time.sleep(4)  # the charts draw as they load
    page.screenshot(path=_beside(out, "charts"))
    texts = page.get_by_role("button").all_inner_texts()
    return [(m.group(1), int(m.group(2))) for t in texts if (m := header.match(t.strip()))]


def _beside(path: str, suffix: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{suffix}{p.suffix}"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tracking_uri")
    p.add_argument("--study")
    p.add_argument("--out", default="docs/images/ui-runs.png")
    p.add_argument("--checks-only", action="store_true",
                   help="no waits for the pictures to settle, no run-charts/run-curves pictures (the test's way)")
    ns = p.parse_args()
    settle = (lambda seconds: None) if ns.checks_only else time.sleep
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("no Chromium found: install Debian's `chromium` or set $CHROMIUM", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from pipelines import tracking as trk
    from server.process import free_port
    from pipelines.compare import find_parent

    uri = trk.resolve_tracking_uri(ns.tracking_uri)
    client = trk.MlflowClient(uri)
    port = free_port()
    cmd = [sys.executable, "-m", "pipelines", "ui", "--port", str(port), "--tracking_uri", uri,
           *(["--study", ns.study] if ns.study else [])]
    ui = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ui.stdout.readline()
        m = re.search(r"(http://\S+)", line)
        if not m:
            print(f"practicum ui printed no URL: {line!r}", file=sys.stderr)
            return 1
        url = m.group(1)
        exp_id = re.search(r"/experiments/(\d+)/runs", unquote(url)).group(1)
        parents = client.search_runs([exp_id], f"tags.`{trk.TAG_ROLE}` = 'parent'", max_results=1,
                                     order_by=["attributes.start_time DESC"])
        expected = parents[0].info.run_name if parents else find_parent(client, ns.study).info.run_name
        deadline = time.monotonic() + 300  # the server takes seconds to start (a minute on a busy machine)
        while time.monotonic() < deadline and ui.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            print("the MLflow UI did not start", file=sys.stderr)
            return 1
        children = client.search_runs([exp_id], f"tags.`{trk.TAG_ROLE}` = 'variant'", max_results=2,
                                      order_by=["attributes.start_time DESC"])
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url)
            ok = True
            # the runs table lists the study's runs: its seeded runs in their variants' groups (a study's
            # saved view), else the parent run (not the breadcrumb, which also bears the study's name)
            shown = [c.info.run_name for c in children[:1]] + [expected]
            try:
                page.get_by_role("row").filter(has_text=re.compile("|".join(map(re.escape, shown)))).first.wait_for(
                    timeout=60_000)
            except Exception:  # noqa: BLE001
                ok = False
            close = page.get_by_role("button", name="Close")  # the assistant's side panel
            if close.count():
                close.first.click()
            settle(2)  # let the table settle for the picture
            Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=ns.out)
            landed = page.url
            grouped = group_by_variant(page, ns.out)
            checks = {
                "the runs route": f"/experiments/{exp_id}/runs" in landed,
                "the model-training view": "workflowType=machine_learning" in landed and ml_view(page),
                f"the study's runs listed ({' or '.join(shown)})": ok,
            }
            # The study's saved chart view (pipelines.chart_view): the training curves come first.
            sections = chart_sections(page, ns.out)
            print("chart sections: " + ", ".join(f"{name} ({n})" for name, n in sections))
            checks["the chart view opens on a training-curve section"] = bool(
                sections) and sections[0][0].split("/")[0] in ("train", "val") and sections[0][1] > 0
            checks["the chart view in the model-training view"] = ("workflowType=machine_learning" in page.url
                                                                   and ml_view(page))
            # Past the landing page: pages a user reaches in a click or two carry no workflowType
            # parameter; they must stay in the model-training view all the same.
            if children:
                run = children[0].info
                page.goto(f"{base}/#/experiments/{exp_id}/runs/{run.run_id}")
                page.get_by_text(run.run_name, exact=True).first.wait_for(timeout=60_000)
                settle(2)
                page.screenshot(path=_beside(ns.out, "run"))
                checks["a run page in the model-training view"] = ml_view(page)
            if children and not ns.checks_only:
                page.get_by_role("tab", name="Model metrics").first.click()
                time.sleep(4)  # the charts load as they scroll into view
                page.screenshot(path=_beside(ns.out, "run-charts"))
                page.get_by_placeholder("Search metric charts").fill("loss")  # MLflow sorts sections by name
                time.sleep(4)
                page.screenshot(path=_beside(ns.out, "run-curves"))
            if len(children) == 2:
                ids = json.dumps([c.info.run_id for c in children])
                page.goto(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp_id])}")
                page.get_by_text(children[0].info.run_name).first.wait_for(timeout=60_000)
                settle(2)
                page.screenshot(path=_beside(ns.out, "compare"))
                checks["the compare page in the model-training view"] = ml_view(page)
            browser.close()
        # Grouping the runs table by variant averages what carries the variant tag: seeded runs only.
        tagged = client.search_runs([exp_id], f"tags.`{trk.TAG_VARIANT}` != ''", max_results=5000)
        roles = {r.data.tags.get(trk.TAG_ROLE) for r in tagged}
        seeded = client.search_runs([exp_id], f"tags.`{trk.TAG_ROLE}` = 'variant'", max_results=5000)
        per_variant = {v: sum(r.data.tags.get(trk.TAG_VARIANT) == v for r in seeded)
                       for v in {r.data.tags.get(trk.TAG_VARIANT) for r in seeded}}
        checks["grouping by variant holds seeded runs only"] = roles <= {"variant"} and grouped == per_variant
        print(f"groups in the browser: {grouped}; seeded runs per variant: {per_variant}")
        for what, passed in checks.items():
            print(f"{'ok  ' if passed else 'FAIL'} {what}")
        print(f"{landed}\nscreenshot: {ns.out}")
        return 0 if all(checks.values()) else 1
    finally:
        os.killpg(ui.pid, signal.SIGTERM)


if __name__ == "__main__":
    raise SystemExit(main())
