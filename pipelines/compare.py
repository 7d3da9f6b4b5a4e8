"""Comparison tables rebuilt from MLflow alone: a comparison is a query, never a re-run.

A study's variants run once per seed; the table gives each variant's mean with its 95% interval
over seeds and, against the baseline variant, the paired difference, one of four words
(`pipelines.stats.WORDS`), the smallest difference the seeds could detect and the seeds a decision
would need; then the study's claims (`pipelines.verdicts`). `pipelines.tables` prints it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pandas as pd
from mlflow.tracking import MlflowClient

from pipelines import stats as st
from pipelines import tracking as trk
from pipelines import bars as bs
from pipelines import verdicts as vd
from pipelines.sequential import Design

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


WALL = "_wall_s"  # a run's start to end, for planning; not a metric
BUDGET_KEYS = ("budget/steps", "budget/samples", "budget/tokens")
BUDGET_COLUMNS = ("budget/steps", "budget/samples", "budget/tokens", "params/trainable", "time/fit_s")


@dataclass
class StudyTable:
    """What `practicum compare` shows, rebuilt from the parent run's tags and its children.

    runs: one row per run (variant, seed, status, metrics): the raw values.
    summary: one row per variant: n, status, per column the mean and the 95% half-width over seeds,
        then the report metric against the baseline (paired difference, interval, ratio, verdict).
    differences: every column with a better direction, each variant against the baseline.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    differences: pd.DataFrame
    baseline: str | None
    report_metric: str
    warnings: list[str] = field(default_factory=list)
    quick: bool = False
    claims: list[vd.ClaimResult] = field(default_factory=list)
    bars: list[bs.BarResult] = field(default_factory=list)  # the study's stage bars (`pipelines.bars`)
    plan: vd.Plan = field(default_factory=vd.Plan)
    margins: dict[str, float] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)  # mean seconds per run of each variant
    name: str = "STUDY"
    comparable: list[str] | None = None  # the study's `comparable:`; None: every metric

    def verdict_line(self) -> str:
        """One line: each variant against the baseline on the report metric, as the verdicts say it."""
        d = self.differences[self.differences["metric"] == self.report_metric]
        if not self.is_comparable(self.report_metric):
            return f"{self.report_metric}: no verdict, the study declares it not comparable across variants"
        if d.empty:
            return f"{self.report_metric}: no baseline to compare against"
        m = self.report_metric
        parts = []
        for _, r in d.iterrows():
            vs = f" vs {r['baseline']}" if r["baseline"] != self.baseline else ""
            if not r["n_pairs"]:  # no seed finished on both sides: nothing to compare, so no blank figures
                parts.append(f"{r['variant']}{vs}: no seed finished on both sides")
                continue
            more = f"; {r['seeds needed']:.0f} seeds would decide" if r["verdict"] == "inconclusive" and \
                math.isfinite(r["seeds needed"]) else ""
            parts.append(f"{r['variant']}{vs} {r['verdict']} (Δ {human(r['difference'], m)} ± {human(r['difference ±'], m)}"
                         f", n={r['n_pairs']}{more})")
        return (f"{m} vs {self.baseline}: " + "; ".join(parts)
                + (" [quick: a smoke test, not a verdict]" if self.quick else ""))

    def is_comparable(self, metric: str) -> bool:
        return self.comparable is None or metric in self.comparable

    def claim_lines(self) -> list[str]:
        return [f"claim {c.line(human)}" for c in self.claims]


def _meta(parent) -> dict:
    t = parent.data.tags
    return {"columns": json.loads(t.get("practicum.columns", "null")), "baseline": t.get("practicum.baseline"),
            "report": t.get("practicum.report", "val"), "primary": t.get("practicum.primary_metric", "val/loss"),
            "modes": json.loads(t.get("practicum.modes", "{}")), "quick": t.get("practicum.quick") == "true",
            "equal_budget": t.get("practicum.equal_budget", "true") == "true",
            "margins": json.loads(t.get("practicum.margins", "{}")), "claims": json.loads(t.get("practicum.claims", "[]")),
            "design": json.loads(t.get("practicum.design", "null")), "looks": json.loads(t.get("practicum.looks", "[]")),
            "comparable": json.loads(t.get("practicum.comparable", "null")), "name": t.get(trk.TAG_STUDY, "STUDY"),
            "against": json.loads(t.get("practicum.against", "{}")),
            "bars": json.loads(t.get("practicum.bars", "[]")), "stages": json.loads(t.get("practicum.stages", "{}")),
            "variants": json.loads(t.get("practicum.variants", "[]"))}


def reported(key: str, report: str) -> str:
    """A validation metric's held-out twin when the study reports the test split."""
    return "test/" + key[len("val/"):] if report == "test" and key.startswith("val/") else key


def run_rows(client: MlflowClient, parent) -> pd.DataFrame:
    """One row per variant run and per estimate (`practicum estimate --study`): variant, seed, status, metrics."""
    rows = []
    for r in children(client, parent):
        seed = r.data.tags.get("practicum.seed")
        wall = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else math.nan
        rows.append({"variant": r.data.tags.get(trk.TAG_VARIANT, r.info.run_name), "seed": seed,
                     "status": r.info.status, "tuned": r.data.tags.get("practicum.tuned"), **r.data.metrics,
                     WALL: wall})
    for r in children(client, parent, role="estimate"):  # predicted ledger rows
        rows.append({"variant": f"{r.data.tags.get(trk.TAG_VARIANT)} (estimate)", "seed": None, "status": "ESTIMATE",
                     **{k.removeprefix("estimate/"): v for k, v in r.data.metrics.items()}})
    return pd.DataFrame(rows, columns=["variant", "seed", "status", "tuned"] + sorted({k for r in rows for k in r} - {
        "variant", "seed", "status", "tuned"}))


def study_table(client: MlflowClient, parent) -> StudyTable:
    meta = _meta(parent)
    runs = run_rows(client, parent)
    wall = runs.groupby("variant")[WALL].mean().to_dict() if WALL in runs else {}
    runs = runs.drop(columns=[WALL], errors="ignore")
    columns = meta["columns"] or sorted(c for c in runs.columns[4:] if not c.startswith("system/"))
    columns = list(dict.fromkeys(reported(c, meta["report"]) for c in columns))
    _check_columns(meta, runs)
    comparable = None if meta["comparable"] is None else [reported(c, meta["report"]) for c in meta["comparable"]]
    report_metric = reported(meta["primary"], meta["report"])
    if report_metric in columns:  # the study's primary metric first
        columns.remove(report_metric)
    columns = [report_metric, *columns, *(b for b in BUDGET_COLUMNS if b not in columns and b in runs.columns)]
    for c in columns:
        if c not in runs.columns:
            runs[c] = float("nan")
    variants = list(dict.fromkeys(runs["variant"]))
    baseline = meta["baseline"] if meta["baseline"] in variants else (variants[0] if variants else None)
    by_variant = {v: runs[runs["variant"] == v] for v in variants}
    plan = vd.Plan(Design(**meta["design"]) if meta["design"] else None, meta["looks"])
    margins = {reported(k, meta["report"]): float(v) for k, v in meta["margins"].items()}
    against = {v: b for v, b in meta["against"].items() if v in by_variant and b in by_variant}
    bases = {baseline, *against.values()} - set(against)  # the baselines: no verdict of their own
    delta = f"Δ vs {baseline}" if not against else "Δ vs baseline"
    rows, diffs = [], []
    for v, g in by_variant.items():
        statuses = list(g["status"])
        status = statuses[0] if len(set(statuses)) == 1 else f"{statuses.count('FINISHED')}/{len(statuses)} FINISHED"
        b = None if baseline is None or v in bases or v.endswith("(estimate)") else against.get(v, baseline)
        row = {"variant": v, "n": len(g), "status": status, **({"vs": b or ""} if against else {})}
        if g["tuned"].notna().any():  # the best config of the variant's search, which its seeded runs used
            row["tuned"] = g["tuned"].dropna().iloc[0]
        ok = g[g["status"].isin(["FINISHED", "ESTIMATE"])]
        for c in columns:
            row[c], row[f"{c} ±"], _ = st.mean_ci(ok[c].tolist())
        if b is not None:
            base = by_variant[b]
            base = base[base["status"] == "FINISHED"]
            for c in columns:
                mode = st.mode_of(c, meta["modes"])
                if mode is None or (comparable is not None and c not in comparable):  # no verdict: no difference
                    continue
                d = st.paired(_by_seed(ok, c), _by_seed(base, c))
                b_mean = st.mean_ci(base[c].tolist())[0]
                diffs.append({"variant": v, "metric": c, "baseline": b, "n_pairs": d.n, "difference": d.mean,
                              "difference ±": plan.half(d, st.ALPHA), "ratio": row[c] / b_mean if b_mean else math.nan,
                              "verdict": vd.word(d, mode, margins.get(c), plan), "margin": margins.get(c, math.nan),
                              "detectable": plan.detectable(d, st.ALPHA),
                              "seeds needed": math.nan, "_diff": d})
        rows.append(row)
    differences = pd.DataFrame(diffs, columns=["variant", "metric", "baseline", "n_pairs", "difference", "difference ±",
                                               "ratio", "verdict", "margin", "detectable", "seeds needed", "_diff"])
    mine = differences["metric"] == report_metric
    if mine.any():  # the k comparisons on the report metric: one Holm family (the planning too: alpha / k)
        k = int(mine.sum())
        differences.loc[mine, "verdict"] = vd.family_words(list(differences.loc[mine, "_diff"]),
                                                           st.mode_of(report_metric, meta["modes"]),
                                                           margins.get(report_metric), plan)
        differences.loc[mine, "seeds needed"] = [plan.needed(d, margins.get(report_metric, abs(d.mean)), st.ALPHA / k)
                                                 for d in differences.loc[mine, "_diff"]]
    for row in rows:
        r = differences[mine & (differences["variant"] == row["variant"])]
        if not r.empty:
            r = r.iloc[0]
            row.update({delta: r["difference"], f"{delta} ±": r["difference ±"],
                        "ratio": r["ratio"], "verdict": r["verdict"], "detectable": r["detectable"],
                        "seeds needed": r["seeds needed"]})
    differences = differences.drop(columns="_diff")
    summary = pd.DataFrame(rows)
    claims = vd.evaluate_claims([vd.Claim(**c) for c in meta["claims"]], _by_variant_seed(by_variant),
                                baseline, meta["modes"], margins, plan) if meta["claims"] and baseline else []
    return StudyTable(runs, summary, differences, baseline, report_metric,
                      _budget_warnings(runs, variants) if meta["equal_budget"] else [], meta["quick"],
                      claims, _bars(client, meta), plan, margins, wall, meta["name"], comparable)


def _bars(client: MlflowClient, meta: dict) -> list[bs.BarResult]:
    """The study's bars, judged on the metrics of the stage runs its parent used (`practicum.stages`)."""
    bars = [bs.Bar(**b) for b in meta["bars"]]
    if not bars:
        return []
    runs = {name: meta["stages"][name] for name in {b.stage for b in bars} if name in meta["stages"]}
    return bs.evaluate_bars(bars, {name: client.get_run(run_id).data.metrics for name, run_id in runs.items()})


def _check_columns(meta: dict, runs: pd.DataFrame) -> None:
    """Every column the study asks for is a metric some finished run (or estimate) logged; else an error
    naming it (a missing column would be an empty cell, or no column at all, and nobody would notice)."""
    done = runs["status"].isin(["FINISHED", "ESTIMATE"])
    if meta["columns"] is None or not (runs["status"] == "FINISHED").any():
        return  # nothing finished yet (or every run failed): the runs' errors say more than a column would
    if set(meta["variants"]) - set(runs.loc[runs["status"] == "FINISHED", "variant"]):
        return  # a variant without a finished run (an interrupted study) may be the one that logs the column
    logged = {c for c in runs.columns[4:] if runs.loc[done, c].notna().any()}
    missing = [(c, reported(c, meta["report"])) for c in meta["columns"] if reported(c, meta["report"]) not in logged]
    if missing:
        named = ", ".join(k if k == c else f"{k} (asked as {c}; report: {meta['report']} reads the {meta['report']} "
                          "split)" for c, k in missing)
        raise trk.ConfigError(f"study '{meta['name']}': column(s) {named} match no metric its finished runs logged; "
                              f"remove them from the study's columns: or log them. Logged: {', '.join(sorted(logged))}")


def _by_variant_seed(by_variant: dict[str, pd.DataFrame]) -> dict[str, dict[str, dict]]:
    """{variant: {metric: {seed: value}}} of the finished runs."""
    out = {}
    for v, g in by_variant.items():
        ok = g[g["status"] == "FINISHED"]
        out[v] = {c: _by_seed(ok, c) for c in ok.columns[4:]}
    return out


def _by_seed(g: pd.DataFrame, c: str) -> dict:
    return {s: v for s, v in zip(g["seed"], g[c]) if s is not None}


def _budget_warnings(runs: pd.DataFrame, variants: list[str]) -> list[str]:
    """The study says its variants train on equal budgets: name every budget that differs."""
    out = []
    real = runs[~runs["variant"].str.endswith("(estimate)") & (runs["status"] == "FINISHED")]
    for key in BUDGET_KEYS:
        if key in real.columns:
            means = real.groupby("variant")[key].mean().dropna()
            if len(means) > 1 and means.max() != means.min():
                shown = ", ".join(f"{v}={means[v]:.6g}" for v in variants if v in means)
                out.append(f"warning: {key} differs between variants ({shown}) although the study declares equal budgets")
    return out


def human(value: float, key: str) -> str:
    """4 significant digits; bytes as KiB/MiB/GiB, seconds with "s"."""
    if value is None or not math.isfinite(value):
        return ""
    if key.endswith("_bytes"):
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= size:
                return f"{value / size:.4g} {unit}"
        return f"{value:.4g} B"
    if key.endswith(("_s", "/fit_s")) and "per_s" not in key:
        return f"{value:.4g} s"
    return f"{value:.4g}"
