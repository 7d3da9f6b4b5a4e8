"""A study's verdict fields, seeds on demand, and the verdict where MLflow users look: what
`pipelines.study` calls.

* `settle`: `margins:`, `claims:` and `seeds:` (a list, or ``{pilot, max}``) checked and completed;
* `run_rounds`: the seeds in rounds until every claim is decided or the cap is reached
  (`pipelines.sequential.Design`; the seed counts looked at so far are the parent's
  ``practicum.looks`` tag, which the table reads to build its repeated intervals);
* `log_verdicts`: the parent run's metrics ``<metric>/<variant>/mean`` and ``<metric>/<variant>/ci_half``
  (95% half-width over seeds) for the report metric and every claim's metric, and the tags
  ``claim/<variant>/<metric>/<expect>`` = holds | fails | inconclusive and ``verdict/<variant>``;
* `plan_lines`: per comparison and claim, the seeds a decision needs and how long they would take.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

from tqdm.auto import tqdm

from pipelines import verdicts as vd
from pipelines.compare import StudyTable, human, reported, study_table
from pipelines.sequential import Design
from pipelines.tracking import ConfigError

AUTO = Design(pilot=3, max=20)


def settle(study, where: str, seeds: str | None = None) -> None:
    """Check and complete a parsed study's `margins:`, `claims:` and `seeds:` in place: metric keys as
    the table shows them (`report: test`), claims checked, ``seeds: {pilot, max}`` (or `seeds` = "auto",
    ``--seeds auto``) becomes `study.design` with the seeds 0 .. max-1."""
    if seeds == "auto":
        study.seeds = AUTO
    elif seeds is not None:
        raise ConfigError(f"--seeds takes 'auto' (seeds in rounds: {{pilot: 3, max: 20}}); got {seeds!r}")
    if isinstance(study.seeds, Design):
        study.design, study.seeds = study.seeds, list(range(study.seeds.max))
    if any(v <= 0 for v in study.margins.values()):
        raise ConfigError(f"{where}: margins map metric keys to a positive size, e.g. {{test/loss: 0.02}}; "
                          f"got {study.margins}")
    study.margins = {reported(k, study.report): float(v) for k, v in study.margins.items()}
    own = study.against()  # a claim on a variant with its own baseline is judged against that baseline
    study.claims = [replace(c, metric=reported(c.metric, study.report), against=c.against or own.get(c.variant))
                    for c in study.claims]
    if study.comparable is not None:
        study.comparable = [reported(k, study.report) for k in study.comparable]
    try:
        vd.check_claims(study.claims, list(study.variants), study.baseline or next(iter(study.variants)),
                        study.margins, study.modes, study.comparable)
    except vd.ClaimError as e:
        raise ConfigError(f"{where}: {e}") from None


def parent_tags(study) -> dict[str, str]:
    """What the table needs to rebuild the verdicts from MLflow alone."""
    return {"practicum.margins": json.dumps(study.margins), "practicum.comparable": json.dumps(study.comparable),
            **({"practicum.against": json.dumps(study.against())} if study.against() else {}),
            "practicum.claims": json.dumps([{k: v for k, v in asdict(c).items() if v is not None}
                                            for c in study.claims]),
            **({"practicum.bars": json.dumps([asdict(b) for b in study.bars])} if study.bars else {}),
            **({"practicum.design": json.dumps(asdict(study.design))} if study.design else {})}


def run_rounds(parent, names: list[str], stage_runs: dict[str, str], run_jobs, pilot_only: bool = False) -> list:
    """Every variant once per seed (`run_jobs`), in rounds where the study declares ``seeds: {pilot, max}``:
    the pilot, then `step` more seeds at a time for the variants of every undecided claim, until each is
    decided or `max` seeds ran. `pilot_only`: the first round only (the pilot, or the first 3 seeds)."""
    study, client = parent.study, parent.client
    design = study.design
    seeds = study.seeds[:design.pilot] if design else study.seeds[:3] if pilot_only else study.seeds
    results: list = []
    while True:
        results += run_jobs(parent, names, stage_runs, seeds=seeds)
        if pilot_only or design is None or any(r.status == "KILLED" for r in results):
            return results
        n = study.seeds.index(seeds[-1]) + 1
        record_look(client, parent.run_id, n)
        names, seeds = next_round(study, study_table(client, client.get_run(parent.run_id)), n, names)
        if not names:
            return results
        tqdm.write(f"[{study.name}] round at {n} seeds: undecided, {len(seeds)} more seed(s) for {', '.join(names)}")


def next_round(study, table: StudyTable, n: int, names: list[str]) -> tuple[list[str], list]:
    """(variants, seeds) of the next round after n seeds: of `names` (the variants running), those of
    every undecided claim and the ones they are compared with (without claims: of every inconclusive
    comparison on the report metric), at the next `step` seeds; none when all are decided or `max` seeds ran."""
    if study.claims:
        pairs = {(c.claim.variant, c.claim.against or table.baseline) for c in table.claims if not c.decided}
    else:
        d = table.differences[table.differences["metric"] == table.report_metric]
        pairs = {(v, b) for v, b, w in zip(d["variant"], d["baseline"], d["verdict"]) if w == "inconclusive"}
    pairs = {p for p in pairs if set(p) <= set(names)}  # a skipped variant's claim waits for another machine
    if not pairs or n >= study.design.max:
        return [], []
    wanted = {v for p in pairs for v in p}
    return [v for v in study.variants if v in wanted], study.seeds[n:min(study.design.max, n + study.design.round)]


def record_look(client, parent: str, n: int) -> None:
    """Add a look at n seeds to the parent's ``practicum.looks`` (the table's repeated intervals read it)."""
    looks = json.loads(client.get_run(parent).data.tags.get("practicum.looks", "[]"))
    if not looks or looks[-1] != n:
        client.set_tag(parent, "practicum.looks", json.dumps([*looks, n]))


def record(table: StudyTable) -> tuple[dict[str, float], dict[str, str]]:
    """The parent's metrics and tags (see the module's docstring)."""
    keys = list(dict.fromkeys([table.report_metric, *(c.claim.metric for c in table.claims)]))
    metrics = {}
    for _, row in table.summary.iterrows():
        if str(row["variant"]).endswith("(estimate)"):
            continue
        for k in keys:
            for stat, col in (("mean", k), ("ci_half", f"{k} ±")):
                v = row.get(col, math.nan)
                if v is not None and v == v and math.isfinite(v):
                    metrics[f"{k}/{row['variant']}/{stat}"] = float(v)
    tags = {c.claim.key: c.outcome for c in table.claims} | {b.bar.key: b.outcome for b in table.bars}
    if "verdict" in table.summary:
        tags |= {f"verdict/{v}": w for v, w in zip(table.summary["variant"], table.summary["verdict"])
                 if isinstance(w, str) and w}
    return metrics, tags


def log_verdicts(client, parent: str, table: StudyTable) -> None:
    from mlflow.entities import Metric, RunTag

    metrics, tags = record(table)
    import time

    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])


def finished_table(name: str, tracking_uri: str | None = None) -> StudyTable | None:
    """The table of the study's latest run when it has finished runs (what `--plan` reads), else None."""
    from pipelines import tracking as trk
    from pipelines.compare import StudyNotFound, find_parent

    client = trk.MlflowClient(trk.resolve_tracking_uri(tracking_uri))
    try:
        table = study_table(client, find_parent(client, name))
    except StudyNotFound:
        return None
    return table if (table.runs["status"] == "FINISHED").any() else None


def plan_lines(table: StudyTable) -> list[str]:
    """Per comparison on the report metric and per claim: the seeds a decision needs and, at the mean
    wall time of one run of each side, how long the missing seeds would take."""
    def eta(variant: str, n: int, needed: float, other: str | None = None) -> str:
        if not math.isfinite(needed):
            return "more than 200 seeds: no plan" if needed == math.inf else "no spread yet: run at least 2 seeds"
        more = max(0, int(needed) - n)
        secs = more * (table.wall_s.get(variant, math.nan) + table.wall_s.get(other or table.baseline, math.nan))
        return f"{int(needed)} seeds (+{more}, about {human(secs, 'time_s')} here)" if more else \
            f"{int(needed)} seeds: the {n} run should do"

    out = []
    d = table.differences[table.differences["metric"] == table.report_metric]
    for _, r in d.iterrows():
        out.append(f"{r['variant']} vs {r['baseline']} on {table.report_metric}: {r['verdict']} at n={r['n_pairs']}; "
                   + ("decided" if r["verdict"] != "inconclusive" else
                      eta(r["variant"], r["n_pairs"], r["seeds needed"], r["baseline"])))
    for c in table.claims:
        out.append(f"claim {c.claim}: {c.outcome} at n={c.n}; "
                   + ("decided" if c.decided else eta(c.claim.variant, c.n, c.needed, c.claim.against)))
    return out
