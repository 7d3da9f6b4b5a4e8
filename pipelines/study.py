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
    variants: {llama-full: {against: llama-lora, ...}}   # a variant's own baseline (one family of several
                                   # bases: each compared within its base); a variant named by `against` is a
                                   # baseline itself and gets no verdict
    report: test                   # report the held-out test split (val/X columns become test/X)
    modes: {val/bleu: max}         # which way is better, where the metric's name does not say
    equal_budget: true             # warn in the table when steps/samples/tokens differ (default true)
    quick: true                    # the table says it is a smoke test, not a verdict
    scatter: [[val/kl, val/true_reward]]   # plots/<y>_vs_<x>.png: one point per run, variant means with intervals
    tune: {n_trials: 6, params: {model.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}
                                   # per variant, the same budget each (`pipelines.tune`); the seeded
                                   # runs then use the variant's best config
    resources: {num_cpus: 1, num_gpus: 0}   # what each run declares as a Ray task (--ray)
    margins: {val/loss: 0.02}      # the difference that matters: within it, "equivalent"
    claims: [{variant: moe, metric: val/loss, expect: better}]   # what the study exists to show
    bars: [{stage: reward, metric: test/accuracy, at_least: 0.6, count: test/pairs}]   # a stage's
                                   # proportion against a bar: an exact binomial bound over `count` items
    comparable: [val/loss, perf/tokens_per_s]   # the only metrics that get verdicts (default: all)
    seeds: {pilot: 3, max: 20}     # instead of a list: rounds until every claim is decided (`pipelines.rounds`)

`requires` (a name or a list; known: cuda, bitsandbytes) keeps a variant out of a study on
machines that cannot run it, so one study file serves a laptop and a GPU node alike; skipped
variants are printed and listed in the parent run's `practicum.skipped` tag.

The `Study` dataclass is the file's schema: jsonargparse reads the file against its typed fields,
as a run config is read against a module's signature (`load_study`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from tqdm.auto import tqdm

from pipelines import rounds
from pipelines.compare import StudyTable, reported
from pipelines.config import to_cli_args
from pipelines.executor import Slot
from pipelines.plots import study_plots  # noqa: F401  (the study's figures, long imported from here)
from pipelines.sequential import Design
from pipelines.tracking import ConfigError
from pipelines.bars import Bar, parse_bars
from pipelines.verdicts import Claim, ClaimError

OPAQUE = ("variants", "overrides", "tune")  # Study fields whose values other parsers read
DERIVED = ("path", "variant_tune", "design")  # Study fields load_study sets, not keys of the file
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


@dataclass
class Stage:
    """An earlier run the variants need (a pretrained base, say).

    Args:
        config: The stage's run config, relative to the study file.
        overrides: Dotted overrides of that config.
    """

    config: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    """A study file, as written (the module docstring shows one); `load_study` reads and checks it.

    Relative paths (`base`, a variant's ``base``, a stage's ``config``) are relative to the file;
    `load_study` resolves `base` and records the file as `path`. `tune` becomes a
    `pipelines.tune.TuneSpec`.
    """

    name: str
    base: Path
    variants: dict[str, Optional[dict[str, Any]]]
    primary_metric: str = "val/loss"
    columns: Optional[list[str]] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Stage] = field(default_factory=dict)
    seeds: Union[list[Optional[int]], Design] = field(default_factory=lambda: [None])
    seed_keys: list[str] = field(default_factory=lambda: ["seed_everything"])
    baseline: Optional[str] = None
    report: str = "val"
    modes: dict[str, str] = field(default_factory=dict)
    equal_budget: bool = True
    quick: bool = False
    tune: Any = None
    scatter: list[tuple[str, str]] = field(default_factory=list)
    resources: Slot = field(default_factory=Slot)
    margins: dict[str, float] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    comparable: Optional[list[str]] = None  # metrics that mean the same under every variant; None: all
    path: Optional[Path] = None  # the file itself; set by load_study, not a key of the file
    design: Optional[Design] = None  # `seeds: {pilot, max}`, set by load_study (seeds: 0 .. max-1)
    variant_tune: dict[str, Any] = field(default_factory=dict)  # set by load_study from variants' tune_params

    def tune_for(self, name: str):
        """The variant's search: its own `tune_params` under the study's budget, else the study's `tune`."""
        return self.variant_tune.get(name, self.tune)

    def against(self) -> dict[str, str]:
        """Each variant's own baseline, where it declares one (`against:`)."""
        return {n: v["against"] for n, v in self.variants.items() if v and v.get("against")}

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
        v.pop("against", None)
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
        config = (self.path.parent / stage.config).resolve()
        extra = [a for a in extra if not a.startswith(("--model.", "--data."))]
        overrides = {k: _fill_stages(v, stage_runs) for k, v in (stage.overrides or {}).items()}
        args = [*to_cli_args(overrides), *extra]
        import torch

        digest = hashlib.sha256("\n".join([config.read_text(), *args, torch.__version__]).encode()).hexdigest()[:16]
        return config, args, digest


def _fill_stages(value: Any, stage_runs: dict[str, str] | None) -> Any:
    if not isinstance(value, str) or stage_runs is None:
        return value
    return STAGE_REF.sub(lambda m: stage_runs[m.group(1)], value)


def load_study(path: str | Path, seeds: str | None = None) -> Study:
    """Read a study file against the `Study` schema, then check what types cannot say (files exist,
    names refer to something); every error names the file, the key and the fix. `seeds`: "auto"
    (``--seeds auto``) runs the seeds in rounds."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    study = _parse(raw, path)
    study.path = path.resolve()
    study.base = (path.parent / study.base).resolve()
    study.variants = {k: v or {} for k, v in study.variants.items()}
    rounds.settle(study, f"study {path}", seeds)  # margins, claims; seeds: {pilot, max} -> design
    _check(study, f"study {path}")
    study.variant_tune = _variant_tune(study, path)
    if isinstance(study.tune, dict) and "params" not in study.tune:
        study.tune = None  # the block only sets the budget of the variants' own searches
    if study.tune is not None:
        from pipelines.tune import TuneSpec

        study.tune = TuneSpec.from_dict(study.tune, f"study {path}, tune")
    study.scatter = [tuple(reported(k, study.report) for k in p) for p in study.scatter]
    return study


def _parse(raw: Any, path: Path) -> Study:
    """jsonargparse reads `raw` against the fields of `Study` (and of `Stage` under ``stages``)."""
    from jsonargparse import ArgumentParser

    keys = [f.name for f in dataclasses.fields(Study) if f.name not in DERIVED]
    if not isinstance(raw, dict):
        raise ConfigError(f"study {path}: a study file is a mapping of keys ({', '.join(keys)}); got {raw!r}")
    if unknown := [k for k in raw if k not in keys]:  # the likeliest cause of any error below: say it first
        raise ConfigError(f"study {path}: unknown key(s) {unknown}; known keys: {', '.join(keys)}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Study, skip=set(DERIVED))
    try:
        parsed = parser.parse_object(copy.deepcopy(raw)).as_dict()  # it would turn raw's dicts into Namespaces
    except Exception as e:  # jsonargparse's ArgumentError: the key, the expected type and the value given
        raise ConfigError(f"study {path}: {_explain(str(e))}") from None
    # Overrides are handed to the run's own parser as written: parsing has expanded any class_path in
    # them with its defaults, which is that parser's job, not the study's.
    parsed.update({k: raw[k] for k in OPAQUE if k in raw})
    parsed["stages"] = {k: Stage(v["config"], raw["stages"][k].get("overrides") or {})
                        for k, v in parsed["stages"].items()}
    parsed["resources"] = Slot(**parsed["resources"])
    parsed["claims"] = [Claim(**c) for c in parsed["claims"]]
    try:
        parsed["bars"] = parse_bars(raw.get("bars"), list(parsed["stages"]))
    except ClaimError as e:
        raise ConfigError(f"study {path}: {e}") from None
    if isinstance(parsed["seeds"], dict):  # seeds: {pilot, max}
        parsed["seeds"] = Design(**parsed["seeds"])
    return Study(**parsed)


def _variant_tune(study: Study, path: Path) -> dict[str, Any]:
    """Each variant's `tune_params` as the study's tune block with those params: the same budget."""
    from pipelines.tune import TuneSpec

    own = {n: v["tune_params"] for n, v in study.variants.items() if "tune_params" in v}
    if own and not isinstance(study.tune, dict):
        raise ConfigError(f"study {path}: variant(s) {sorted(own)} set tune_params but the study has no tune: block "
                          "(n_trials, metric) to give them a budget")
    if own and "params" not in study.tune and set(study.variants) - set(own):
        raise ConfigError(f"study {path}: tune has no params, so every variant needs tune_params; missing for "
                          f"{sorted(set(study.variants) - set(own))}")
    return {n: TuneSpec.from_dict({**study.tune, "params": p}, f"study {path}, variant '{n}', tune_params")
            for n, p in own.items()}


def _explain(msg: str) -> str:
    """jsonargparse's error in one line: ``key 'seeds': expected int or None, got 'q'``."""
    key = m.group(1) if (m := re.search(r'Parser key "([^"]+)"', msg)) else "?"
    if bad := re.search(r"Option '([^']+)' is not accepted", msg):  # inside a stage, the one nested class
        known = ", ".join(f.name for f in dataclasses.fields(Stage))
        return f"key '{key}': unknown key '{bad.group(1)}'; known keys: {known}"
    types = [t.replace("NoneType", "None") for t in re.findall(r"Expected a <class '(\w+)'>", msg)]
    got = m.group(1) if (m := re.search(r"(?:Given value|Got value): (.*)", msg)) else None
    if types and got is not None:
        return f"key '{key}': expected {' or '.join(types)}, got {got}"
    lines = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
    return f"key '{key}': {'; '.join(lines) or msg}"


def _check(study: Study, where: str) -> None:
    if not study.variants:
        raise ConfigError(f"{where}: 'variants' must map variant names to overrides")
    if not study.base.is_file():
        raise ConfigError(f"{where}: base config {study.base} does not exist")
    for name, v in study.variants.items():
        try:
            requirement_names(v.get("requires"))  # probing waits until the study runs
        except ConfigError as e:
            raise ConfigError(f"{where}, variant '{name}': {e}") from None
    for i, (name, stage) in enumerate(study.stages.items()):
        if not (study.path.parent / stage.config).is_file():
            raise ConfigError(f"{where}, stage '{name}': config {(study.path.parent / stage.config).resolve()} "
                              "does not exist")
        earlier = list(study.stages)[:i]
        if set(STAGE_REF.findall(json.dumps(stage.overrides))) - set(earlier):
            raise ConfigError(f"{where}, stage '{name}': {{stages.X}} may name only the stages before it, {earlier}")
    seeds = study.seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of distinct integers, e.g. [0, 1, 2]; got {seeds!r}")
    if study.baseline is not None and study.baseline not in study.variants:
        raise ConfigError(f"{where}: baseline '{study.baseline}' is not a variant; variants: {list(study.variants)}")
    for name, other in study.against().items():
        if other not in study.variants or other == name:
            raise ConfigError(f"{where}, variant '{name}': against '{other}' must name another variant; "
                              f"variants: {list(study.variants)}")
    if study.report not in ("val", "test"):
        raise ConfigError(f"{where}: report must be 'val' or 'test', got {study.report!r}")
    if any(m not in ("min", "max") for m in study.modes.values()):
        raise ConfigError(f"{where}: modes map metric keys to 'min' or 'max', got {study.modes}")
    used = set(STAGE_REF.findall(json.dumps([study.overrides, study.variants])))
    if used - set(study.stages):
        raise ConfigError(f"{where}: {{stages.X}} names unknown stage(s) {sorted(used - set(study.stages))}; "
                          f"stages: {sorted(study.stages)}")


def run_study(
    path: str | Path,
    args: Sequence[str] = (),
    tracking_uri: str | None = None,
    *,
    only: Sequence[str] | None = None,
    system_metrics: bool = True,
    workers: int | None = None,
    ray: str | bool | None = None,
    resume: bool = False,
    seeds: str | None = None,
    pilot_only: bool = False,
) -> tuple[str, StudyTable]:
    """Run every variant once per seed as a child of one parent run; a failing run ends FAILED and the
    study goes on. `seeds` = "auto": in rounds until every claim is decided; `pilot_only`: the first
    round only (`practicum study --plan`).

    `workers` (local processes) or `ray` (True: a local instance or $RAY_ADDRESS; or an address) run
    the jobs in parallel (`pipelines.executor`). `resume` reopens the study's latest parent run and
    runs only the jobs without a finished run, continuing interrupted ones from their checkpoints.

    Returns the parent run id and the comparison (`pipelines.compare.StudyTable`), which is also
    logged to the parent: comparison.csv (the summary's raw values), runs.csv, differences.csv,
    comparison.md, comparison.txt and plots.
    """
    from pipelines.executor import make_executor
    from pipelines.jobs import run_jobs, run_stages, stop_signals_interrupt
    from pipelines.parent import open_parent, summarize

    # 1. Read the study file; keep the variants this machine can run.
    study = load_study(path, seeds)
    names, skipped = runnable_variants(study, only)

    # 2. Open the parent run (or reopen the last one): the study's declarations as its tags.
    parent = open_parent(study, names, skipped, args, tracking_uri, system_metrics, resume)

    with (closing(make_executor(workers, ray, study.resources)) as executor,  # here, local workers or Ray
          stop_signals_interrupt(executor)):  # SIGTERM stops the workers as Ctrl-C does
        # 3. Stages before the variants that need them; a finished matching stage is reused.
        stage_runs = run_stages(parent, executor)

        # 4. The jobs: each variant tuned where the study tunes, then run once per seed; with
        #    `seeds: {pilot, max}` in rounds until every claim is decided (`pipelines.rounds`).
        results = rounds.run_rounds(parent, names, stage_runs, functools.partial(run_jobs, executor=executor),
                                    pilot_only)

    # 5. The summary: the table, its files and plots on the parent, and the parent's status.
    return parent.run_id, summarize(parent, results)


def runnable_variants(study: Study, only: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The variants to run (all, or `only`) and those skipped here, with why."""
    names = list(only or study.variants)
    missing = [n for n in names if n not in study.variants]
    if missing:
        raise ConfigError(f"study '{study.name}' has no variant(s) {missing}; variants: {list(study.variants)}")
    skipped = {}
    for n in names:
        if unmet := unmet_requirements(study.variants[n].get("requires")):
            skipped[n] = "; ".join(unmet)
            tqdm.write(f"[{study.name}] {n}: skipped ({skipped[n]})")
    names = [n for n in names if n not in skipped]
    if not names:
        raise ConfigError(f"study '{study.name}': every variant was skipped: {skipped}")
    return names, skipped
