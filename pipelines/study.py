"""Side-by-side studies: a base config plus named variants, each a child run under one parent run.

A study file::

    name: dense-vs-moe             # parent run name and the practicum.study tag
    base: ../gpt/plays_char_cpu.yaml   # relative to this file
    primary_metric: val/loss       # plotted over steps, one line per variant
    columns: [val/loss, perf/tokens_per_s]   # optional; default: every logged metric
    overrides: {trainer.max_steps: 300}      # optional, for every variant
    variants:                      # name -> dotted overrides; `base` switches that variant's config
      dense: {}
      moe: {model.init_args.ffn: moe}
      moe-gpu: {requires: cuda, trainer.accelerator: gpu}   # skipped, with a note, where unmet

A study can run earlier stages first, each an MLflow run of its own (a child of the study,
tagged ``practicum.role=stage``), and hand their output to the variants::

    stages:
      base: {config: ../finetune/minigpt_base.yaml, overrides: {trainer.max_steps: 300}}
    overrides: {model.init_args.backbone: "runs:/{stages.base}"}   # the stage's checkpoint

A stage whose config, overrides and torch version match a FINISHED stage run of the same study
experiment is reused, not run again (so a pretrained base is trained once per store).

A study is an experiment with a verdict (`pipelines.compare`, `pipelines.stats`)::

    seeds: [0, 1, 2]               # every variant once per seed (paired: same seed, same data order and init)
    seed_keys: [seed_everything, data.init_args.seed]   # where a seed goes (default: seed_everything)
    baseline: dense                # the variant every other is compared with (default: the first)
    report: test                   # report the held-out test split (val/X columns become test/X)
    modes: {val/bleu: max}         # which way is better, where the metric's name does not say
    equal_budget: true             # warn in the table when steps/samples/tokens differ (default true)
    quick: true                    # the table says it is a smoke test, not a verdict
    scatter: [[val/kl, val/true_reward]]   # plots/<y>_vs_<x>.png: one point per run, variant means with intervals
    tune: {n_trials: 6, params: {model.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}
                                   # per variant, the same budget each (`pipelines.tune`); the seeded
                                   # runs then use the variant's best config
    variants: {svm: {tune_params: {model.init_args.estimator_kwargs.C: {low: 0.1, high: 100, log: true}}}}
                                   # a variant's own search space (families differ in what they
                                   # tune); n_trials, metric and pruner stay the study's: the same budget

`requires` (a name or a list; known: cuda, bitsandbytes) keeps a variant out of a study on
machines that cannot run it, so one study file serves a laptop and a GPU node alike; skipped
variants are printed and listed in the parent run's `practicum.skipped` tag.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipelines import tracking as trk  # noqa: E402
from pipelines.compare import StudyTable, human, render, reported, study_table  # noqa: E402
from pipelines.console import summary_line  # noqa: E402
from pipelines.config import to_cli_args  # noqa: E402
from pipelines.tracking import ConfigError, StageFailed  # noqa: E402

STAGE_REF = re.compile(r"\{stages\.([\w-]+)\}")
REQUIREMENTS = {"cuda": "a CUDA GPU", "bitsandbytes": "bitsandbytes (pip install 'practicum[qlora]')"}


def requirement_names(requires: Any) -> list[str]:
    """`requires` (a name or a list) as a list; unknown names raise ConfigError. Probes nothing."""
    names = [requires] if isinstance(requires, str) else list(requires or [])
    unknown = [r for r in names if r not in REQUIREMENTS]
    if unknown:
        raise ConfigError(f"unknown requirement(s) {unknown}; known: {sorted(REQUIREMENTS)}")
    return names


def unmet_requirements(requires: Any) -> list[str]:
    """The requirements in `requires` this machine does not meet; unknown names raise ConfigError."""
    probes = {"cuda": _cuda_available, "bitsandbytes": _bitsandbytes_installed}
    return [f"needs {REQUIREMENTS[r]}, none here" for r in requirement_names(requires) if not probes[r]()]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


MEMORY_KEYS = ("mem/params_bytes", "mem/grads_bytes", "mem/optimizer_bytes", "mem/activations_bytes")
PEAK_KEYS = ("mem/device_peak_allocated_bytes", "mem/host_peak_rss_bytes")
THROUGHPUT_KEYS = ("perf/tokens_per_s", "perf/samples_per_s")


@dataclass
class Study:
    name: str
    base: Path
    variants: dict[str, dict[str, Any]]
    primary_metric: str = "val/loss"
    columns: list[str] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int | None] = field(default_factory=lambda: [None])
    seed_keys: list[str] = field(default_factory=lambda: ["seed_everything"])
    baseline: str | None = None
    report: str = "val"
    modes: dict[str, str] = field(default_factory=dict)
    equal_budget: bool = True
    quick: bool = False
    tune: Any = None  # pipelines.tune.TuneSpec
    variant_tune: dict[str, Any] = field(default_factory=dict)  # a variant's own search space (`tune_params`)
    scatter: list[list[str]] = field(default_factory=list)
    path: Path | None = None

    def seed_args(self, seed: int | None) -> list[str]:
        """The overrides that put one seed everywhere the study says seeds go (none: the config's own)."""
        return [] if seed is None else [f"--{k}={seed}" for k in self.seed_keys]

    def variant_config(self, name: str, stage_runs: dict[str, str] | None = None) -> tuple[Path, list[str]]:
        """(config file, CLI overrides) of one variant: study overrides first, the variant's win.

        ``{stages.NAME}`` in a value becomes that stage's run id (`stage_runs`); without them the
        reference is left as written (for parsing only).
        """
        v = dict(self.variants[name] or {})
        v.pop("requires", None)
        v.pop("tune_params", None)
        base = (self.path.parent / v.pop("base")).resolve() if "base" in v else self.base
        if not base.is_file():
            raise ConfigError(f"study '{self.name}', variant '{name}': base config {base} does not exist")
        merged = {k: _fill_stages(val, stage_runs) for k, val in {**self.overrides, **v}.items()}
        return base, to_cli_args(merged)

    def stage_config(self, name: str, extra: Sequence[str] = (),
                     stage_runs: dict[str, str] | None = None) -> tuple[Path, list[str], str]:
        """(config file, CLI overrides, digest) of a stage; the digest identifies a reusable run.

        ``{stages.NAME}`` names an earlier stage's run (`stage_runs`): its id enters the digest, so a
        rerun earlier stage gives a new run of this one.

        `extra` are the study's command-line overrides that reach stages: every one but those of
        ``--model.`` and ``--data.``, which name the variants' classes, not the stage's.
        """
        stage = self.stages[name]
        config = (self.path.parent / stage["config"]).resolve()
        extra = [a for a in extra if not a.startswith(("--model.", "--data."))]
        overrides = {k: _fill_stages(v, stage_runs) for k, v in (stage.get("overrides") or {}).items()}
        args = [*to_cli_args(overrides), *extra]
        import torch

        digest = hashlib.sha256("\n".join([config.read_text(), *args, torch.__version__]).encode()).hexdigest()[:16]
        return config, args, digest


def _fill_stages(value: Any, stage_runs: dict[str, str] | None) -> Any:
    if not isinstance(value, str) or stage_runs is None:
        return value
    return STAGE_REF.sub(lambda m: stage_runs[m.group(1)], value)


def _tune_spec(raw: Any, path: Path):
    if raw is None:
        return None
    from pipelines.tune import TuneSpec

    return TuneSpec.from_dict(raw, f"study {path}, tune")


def _variant_tune(raw: dict, path: Path) -> dict[str, Any]:
    """Each variant's `tune_params` as the study's tune block with those params: the same budget."""
    own = {n: v["tune_params"] for n, v in raw["variants"].items() if isinstance(v, dict) and "tune_params" in v}
    if own and not isinstance(raw.get("tune"), dict):
        raise ConfigError(f"study {path}: variant(s) {sorted(own)} set tune_params but the study has no tune: block "
                          "(n_trials, metric) to give them a budget")
    if own and "params" not in raw["tune"] and set(raw["variants"]) - set(own):
        raise ConfigError(f"study {path}: tune has no params, so every variant needs tune_params; missing for "
                          f"{sorted(set(raw['variants']) - set(own))}")
    return {n: _tune_spec({**raw["tune"], "params": p}, path) for n, p in own.items()}


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"name", "base", "variants", "primary_metric", "columns", "overrides", "stages", "seeds", "seed_keys",
               "baseline", "report", "modes", "equal_budget", "quick", "tune", "scatter"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"study {path}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(allowed)}")
    for key in ("name", "base", "variants"):
        if key not in raw:
            raise ConfigError(f"study {path}: missing required key '{key}'")
    if not isinstance(raw["variants"], dict) or not raw["variants"]:
        raise ConfigError(f"study {path}: 'variants' must map variant names to overrides")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"study {path}: base config {base} does not exist")
    for name, v in raw["variants"].items():
        try:
            requirement_names((v or {}).get("requires"))  # probing waits until the study runs
        except ConfigError as e:
            raise ConfigError(f"study {path}, variant '{name}': {e}") from None
    stages = raw.get("stages") or {}
    for i, (name, stage) in enumerate(stages.items()):
        if not isinstance(stage, dict) or set(stage) - {"config", "overrides"} or "config" not in stage:
            raise ConfigError(f"study {path}, stage '{name}': give {{config: FILE, overrides: {{...}}}}")
        if not (path.parent / stage["config"]).is_file():
            raise ConfigError(f"study {path}, stage '{name}': config {(path.parent / stage['config']).resolve()} "
                              "does not exist")
        if set(STAGE_REF.findall(json.dumps(stage.get("overrides")))) - set(list(stages)[:i]):
            raise ConfigError(f"study {path}, stage '{name}': {{stages.X}} may name only the stages before it, "
                              f"{list(stages)[:i]}")
    seeds = raw.get("seeds", [None])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds if x is not None) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"study {path}: seeds must be a non-empty list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    if raw.get("baseline") is not None and raw["baseline"] not in raw["variants"]:
        raise ConfigError(f"study {path}: baseline '{raw['baseline']}' is not a variant; variants: {list(raw['variants'])}")
    if raw.get("report", "val") not in ("val", "test"):
        raise ConfigError(f"study {path}: report must be 'val' or 'test', got {raw['report']!r}")
    modes = raw.get("modes") or {}
    if any(m not in ("min", "max") for m in modes.values()):
        raise ConfigError(f"study {path}: modes map metric keys to 'min' or 'max', got {modes}")
    scatter = raw.get("scatter") or []
    if not isinstance(scatter, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(k, str) for k in p)
                                                for p in scatter):
        raise ConfigError(f"study {path}: scatter is a list of [x metric, y metric] pairs, e.g. [[val/kl, val/reward]]; "
                          f"got {scatter!r}")
    used = set(STAGE_REF.findall(json.dumps([raw.get("overrides"), raw["variants"]])))
    if used - set(stages):
        raise ConfigError(f"study {path}: {{stages.X}} names unknown stage(s) {sorted(used - set(stages))}; "
                          f"stages: {sorted(stages)}")
    return Study(
        name=str(raw["name"]),
        base=base,
        variants=raw["variants"],
        primary_metric=raw.get("primary_metric", "val/loss"),
        columns=raw.get("columns"),
        overrides=raw.get("overrides") or {},
        stages=stages,
        seeds=seeds,
        seed_keys=list(raw.get("seed_keys") or ["seed_everything"]),
        baseline=raw.get("baseline"),
        report=raw.get("report", "val"),
        modes=modes,
        equal_budget=bool(raw.get("equal_budget", True)),
        quick=bool(raw.get("quick", False)),
        # without study-wide params the block only sets the budget of the variants' own searches
        tune=None if isinstance(raw.get("tune"), dict) and "params" not in raw["tune"] else _tune_spec(raw.get("tune"), path),
        variant_tune=_variant_tune(raw, path),
        scatter=[[reported(k, raw.get("report", "val")) for k in p] for p in scatter],
        path=path.resolve(),
    )


def run_study(
    path: str | Path,
    args: Sequence[str] = (),
    tracking_uri: str | None = None,
    *,
    only: Sequence[str] | None = None,
    system_metrics: bool = True,
) -> tuple[str, StudyTable]:
    """Run every variant once per seed as a child of one parent run; a failing run ends FAILED and the
    study goes on.

    Returns the parent run id and the comparison (`pipelines.compare.StudyTable`), which is also
    logged to the parent: comparison.csv (the summary's raw values), runs.csv, differences.csv,
    comparison.md, comparison.txt and plots.
    """
    from pipelines.callbacks import ProgressLine
    from pipelines.run import RunResult, run_experiment  # Lightning: only when variants run
    from pipelines.tune import tune_variant

    study = load_study(path)
    names = list(only or study.variants)
    missing = [n for n in names if n not in study.variants]
    if missing:
        raise ConfigError(f"study '{study.name}' has no variant(s) {missing}; variants: {list(study.variants)}")
    skipped = {}
    for n in names:
        unmet = unmet_requirements((study.variants[n] or {}).get("requires"))
        if unmet:
            skipped[n] = "; ".join(unmet)
            tqdm.write(f"[{study.name}] {n}: skipped ({skipped[n]})")
    names = [n for n in names if n not in skipped]
    if not names:
        raise ConfigError(f"study '{study.name}': every variant was skipped: {skipped}")
    uri = trk.resolve_tracking_uri(tracking_uri)
    client = trk.MlflowClient(uri)
    trk.check_reachable(client, uri)
    exp_id = trk.get_or_create_experiment(client, study.name, uri)
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
    }
    parent = client.create_run(exp_id, tags=tags, run_name=study.name).info.run_id
    client.log_text(parent, trk.redact(Path(path).read_text()), "study.yaml")  # e.g. tune.storage's password
    if args:
        client.log_param(parent, "overrides", trk.redact(" ".join(args)))
    stage_runs = run_stages(study, client, exp_id, parent, uri, args, system_metrics)
    results: list[RunResult] = []
    tuned: dict[str, dict] = {}
    status = "FINISHED"
    jobs = [(name, seed) for name in names for seed in study.seeds]
    metric = reported(study.primary_metric, study.report)
    # One line for the whole study (runs done, elapsed, remaining; the running variant, its step and
    # metric), and one line per finished run above it.
    bar = tqdm(total=len(jobs), desc=study.name, unit="run", position=0, leave=False, dynamic_ncols=True)
    for name, seed in jobs:
        label = name if seed is None else f"{name} seed={seed}"
        bar.set_postfix_str(label)
        child_tags = {trk.TAG_STUDY: study.name, trk.TAG_VARIANT: name, trk.TAG_ROLE: "variant"}
        started = time.monotonic()
        try:
            config, vargs = study.variant_config(name, stage_runs)
            spec = study.variant_tune.get(name, study.tune)
            if spec is not None and name not in tuned:  # the variant's search, once, before its seeds
                tuned[name] = tune_variant(study.name, name, config, [*vargs, *args], spec, uri,
                                           parent_run_id=parent, experiment=study.name, system_metrics=system_metrics,
                                           progress=ProgressLine(bar, f"{name} tuning", spec.metric))
                bar.write(f"[{study.name}] {name}: tuned {tuned[name]['best_params']} "
                          f"({spec.metric} {tuned[name]['best_value']:.4g}, {tuned[name]['n_trials']} trials)")
                started = time.monotonic()
            best = tuned[name]["best_params"] if name in tuned else {}
            if best:
                child_tags["practicum.tuned"] = json.dumps(best)
            res = run_experiment(config, [*vargs, *args, *to_cli_args(best), *study.seed_args(seed)], uri,
                                 experiment=study.name, run_name=label, parent_run_id=parent, tags=child_tags,
                                 system_metrics=system_metrics, callbacks=[ProgressLine(bar, label, study.primary_metric)],
                                 progress_bar=False)
        except (ConfigError, trk.TrackingError) as e:
            # The variant never started: record it as a FAILED child so the table shows it.
            run = client.create_run(exp_id, run_name=label, tags={
                **child_tags, "mlflow.parentRunId": parent, "practicum.error": str(e)[:5000],
                **({"practicum.seed": str(seed)} if seed is not None else {})})
            client.set_terminated(run.info.run_id, "FAILED")
            res = RunResult(run.info.run_id, "FAILED", error=str(e))
        results.append(res)
        bar.update(1)
        bar.write(f"[{study.name}] " + summary_line(label, res, metric, time.monotonic() - started))
        if res.status == "KILLED":
            status = "KILLED"
            break
    bar.close()
    if all(r.status == "FAILED" for r in results):
        status = "FAILED"
    table = study_table(client, client.get_run(parent))
    client.log_text(parent, table.summary.to_csv(index=False), "comparison.csv")
    client.log_text(parent, table.runs.to_csv(index=False), "runs.csv")
    client.log_text(parent, table.differences.to_csv(index=False), "differences.csv")
    client.log_text(parent, render(table, "markdown"), "comparison.md")
    client.log_text(parent, render(table, "table"), "comparison.txt")
    for fname, fig in study_plots(client, parent, study.primary_metric, study.scatter).items():
        client.log_figure(parent, fig, f"plots/{fname}")
        plt.close(fig)
    client.set_terminated(parent, status)
    return parent, table


def run_stages(study: Study, client, exp_id: str, parent: str, uri: str, args: Sequence[str],
               system_metrics: bool) -> dict[str, str]:
    """Run (or reuse) every stage; returns {stage name: run id} and records it on the parent."""
    from pipelines.run import run_experiment

    runs: dict[str, str] = {}
    for name in study.stages:
        config, sargs, digest = study.stage_config(name, args, runs)
        found = client.search_runs(
            [exp_id], f"tags.`{trk.TAG_ROLE}` = 'stage' and tags.`practicum.stage_digest` = '{digest}' "
                      "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            runs[name] = found[0].info.run_id
            tqdm.write(f"[{study.name}] stage {name}: reusing run {runs[name]}")
            continue
        tags = {trk.TAG_STUDY: study.name, trk.TAG_ROLE: "stage", "practicum.stage": name,
                "practicum.stage_digest": digest}
        res = run_experiment(config, sargs, uri, experiment=study.name, run_name=f"stage-{name}",
                             parent_run_id=parent, tags=tags, system_metrics=system_metrics)
        tqdm.write(f"[{study.name}] stage {name}: {res.status}")
        if res.status != "FINISHED":
            client.set_terminated(parent, "FAILED")
            raise StageFailed(f"study '{study.name}': stage '{name}' ended {res.status} ({res.error}); "
                              f"its run is {res.run_id}")
        runs[name] = res.run_id
    if runs:
        client.set_tag(parent, "practicum.stages", json.dumps(runs))
    return runs


def study_plots(client: trk.MlflowClient, parent_id: str, primary: str,
                scatter: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """The primary metric over steps per variant (mean over seeds, band from min to max), the memory
    ledger, the measured peaks and the throughput per variant (mean, error bars: the spread over seeds),
    and one plot per `scatter` pair (x, y) of final metrics: a point per run, the variant's mean with
    95% intervals on both axes (a reward-KL frontier, say)."""
    import numpy as np

    from pipelines.compare import children

    runs = children(client, client.get_run(parent_id))
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.data.tags.get(trk.TAG_VARIANT, r.info.run_name), []).append(r)
    names = list(groups)
    figs: dict[str, Any] = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^vP*X"
    for i, (name, rs) in enumerate(groups.items()):
        curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, primary)} for r in rs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        vals = np.array([[c[t] for t in steps] for c in curves])
        # distinct hollow markers: variants with equal values (two k-NNs) stay visible on top of each other
        (line,) = ax.plot(steps, vals.mean(0), label=f"{name} (n={len(curves)})", marker=markers[i % len(markers)],
                          markevery=max(1, len(steps) // 15), markerfacecolor="none", markersize=5 + 2 * (i % 3))
        if len(curves) > 1 and len(steps) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        elif len(curves) > 1:  # one evaluation (a fit-once model): its spread as an error bar
            ax.errorbar(steps, vals.mean(0), yerr=[vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)],
                        color=line.get_color(), capsize=4, linewidth=1)
    ax.set(xlabel="step", ylabel=primary, title=f"{primary} per variant: mean over seeds, band min-max")
    if ax.lines:
        ax.legend()
    figs[f"{primary.replace('/', '_')}.png"] = fig

    def stat(key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        vals = [[r.data.metrics[key] / scale for r in groups[n] if key in r.data.metrics] for n in names]
        return (np.array([np.mean(v) if v else 0.0 for v in vals]),
                np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]))

    # The ledger, the peaks and the throughput each get their own axis: a few-MiB ledger difference
    # (LoRA's optimizer state against full's) must not be a sliver under a GiB-sized RSS.
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    # The ledger's components side by side on a log axis, each bar labelled: a LoRA run's optimizer
    # state is a few percent of full fine-tuning's, and a logistic regression's KiB sit beside a k-NN's MiB.
    width = 0.8 / len(MEMORY_KEYS)
    for i, key in enumerate(MEMORY_KEYS):
        mean, _ = stat(key)
        x = np.arange(len(names)) + (i - (len(MEMORY_KEYS) - 1) / 2) * width
        bars = ax1.bar(x, np.where(mean > 0, mean, np.nan), width, label=key.split("/")[1].replace("_bytes", ""))
        ax1.bar_label(bars, labels=[human(v, key) if v > 0 else "" for v in mean], fontsize=6, rotation=90,
                      padding=2)
    ax1.set_xticks(np.arange(len(names)), names)
    ax1.set_yscale("log")
    ax1.margins(y=0.25)
    ax1.set(ylabel="bytes (log)", title="memory ledger per component (exact bytes)")
    ax1.legend(fontsize=7)
    width = 0.8 / len(PEAK_KEYS)
    for i, key in enumerate(PEAK_KEYS):
        mean, sd = stat(key, 2**20)
        if mean.any():
            x = np.arange(len(names)) + (i - (len(PEAK_KEYS) - 1) / 2) * width
            bars = ax2.bar(x, mean, width, yerr=sd, capsize=3, label=key.split("/")[1].replace("_bytes", ""))
            ax2.bar_label(bars, fmt="%.4g", fontsize=7)
    ax2.set_xticks(np.arange(len(names)), names)
    ax2.set(ylabel="MiB", title="measured peaks")
    if ax2.containers:
        ax2.legend(fontsize=7)
    key = next((k for k in THROUGHPUT_KEYS if any(k in r.data.metrics for r in runs)), THROUGHPUT_KEYS[1])
    mean, sd = stat(key)
    bars = ax3.bar(names, mean, yerr=sd, capsize=3, color="tab:green")
    ax3.bar_label(bars, fmt="%.4g", fontsize=7)
    if (mean > 0).all() and mean.max() / mean.min() > 20:  # a fit-once model beside gradient steps
        ax3.set_yscale("log")
    ax3.set(ylabel=key, title="throughput (error bar: sd over seeds)")
    for a in (ax1, ax2, ax3):
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    figs["memory_throughput.png"] = fig

    from pipelines.stats import mean_ci

    for x, y in scatter:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name in names:
            pts = [(r.data.metrics[x], r.data.metrics[y]) for r in groups[name] if x in r.data.metrics
                   and y in r.data.metrics]
            if not pts:
                continue
            xs, ys = zip(*pts)
            (mx, hx, _), (my, hy, _) = mean_ci(xs), mean_ci(ys)
            bar = ax.errorbar([mx], [my], xerr=[np.nan_to_num(hx)], yerr=[np.nan_to_num(hy)], fmt="o", capsize=3,
                              label=f"{name} (n={len(pts)})")
            ax.scatter(xs, ys, s=12, alpha=0.4, color=bar[0].get_color())
        ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}")
        if ax.collections:
            ax.legend(title="dots: runs; bars: mean, 95% interval", fontsize=7, title_fontsize=7)
        fig.tight_layout()
        figs[f"{y.replace('/', '_')}_vs_{x.replace('/', '_')}.png"] = fig
    return figs
