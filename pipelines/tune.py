"""Budgeted hyperparameter search for one variant of a study: Optuna proposes, the pipeline runs.

A study file declares it (`TuneSpec.from_dict` reads the ``tune:`` block)::

    tune:
      n_trials: 8                 # the budget, the same for every variant
      metric: val/loss            # objective, read from the validation split
      direction: minimize
      pruner: median              # median | successive_halving | none
      pruner_args: {n_startup_trials: 3}   # optional, the pruner class's own arguments
      storage: null               # default: sqlite beside the tracking store (mlruns/optuna.db)
      heartbeat_interval: 60      # seconds; a trial silent for grace_period (default 2x) is FAIL, retried once
      params:
        model.init_args.lr: {low: 1.0e-4, high: 3.0e-2, log: true}
        model.init_args.r: {low: 4, high: 64, log: true, type: int}

Every trial is one real `run_experiment`: an MLflow child run of the study's parent, tagged
``practicum.role=trial`` and ``practicum.trial_state`` (COMPLETE, PRUNED or FAIL). A Lightning
callback reports the metric at each validation and stops a trial the pruner gives up on.

The budget lives in the Optuna storage, not in a process: Optuna's `MaxTrialsCallback` stops a
worker once the study holds ``n_trials`` finished or running trials, so re-running a finished study
runs nothing, and an interrupted one runs only what is missing. A trial that crashed or that the
model refused (FAIL) has spent its slot; one stopped by Ctrl-C or SIGTERM has not, and tuning stops
there. A worker killed outright (SIGKILL, the OOM killer, a lost machine) stops sending the storage's
heartbeat (``heartbeat_interval``, default 60 s); after ``grace_period`` (default twice that) the
next worker to start a trial closes it as FAIL and Optuna's `RetryHeartbeatStaleTrialCallback` queues its
params once more, in the dead trial's slot. The sampler is TPE, which draws at random for its first
10 trials (Optuna's default), so a budget of 10 or fewer is a seeded random search.

Several machines share one search by sharing its storage. Give the study file an RDB URL that every
machine can reach and start the same command on each::

    tune: {storage: "postgresql://user:pass@db-host/optuna", ...}   # psycopg2, which Practicum installs
    practicum study configs/studies/STUDY.yaml        # on every worker, same file

Each worker asks the storage for the next trial, and stops when the storage holds ``n_trials``:
together they run ``n_trials`` per variant, or one more per extra worker where several finish a trial
at the same instant (the count and the next trial are not one transaction). The default SQLite
file serves several processes on one machine, not several machines. Point every worker at one
MLflow server too (``MLFLOW_TRACKING_URI``), so all the trial runs land in one place. A worker returns
when no slot is left, so its best is over the trials finished by then; a later run reads the final one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from lightning import Callback
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipelines import tracking as trk
from pipelines.tracking import ConfigError

PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
SPENT = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
# Several workers write one SQLite file: a writer waits up to a minute for the lock (Python's default is
# 5 s, which a loaded machine exceeds) instead of failing with "database is locked".
SQLITE_WAIT = {"connect_args": {"timeout": 60}}
UNCOUNTED = "practicum.uncounted"  # user attr of a closed trial that says nothing about its params


@dataclass
class ParamSpec:
    """One searched value: a range, sampled uniformly or (``log``) log-uniformly."""

    low: float
    high: float
    log: bool = False
    type: str = "float"  # float | int

    def suggest(self, trial: optuna.Trial, name: str) -> float | int:
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass
class TuneSpec:
    """A variant's search, as the study's ``tune:`` block declares it (read it with `from_dict`).

    Args:
        params: Dotted config key -> its range.
        n_trials: Finished trials per variant, shared by every worker on the storage.
        metric: The objective, a key the module logs at validation.
        direction: minimize or maximize.
        pruner: median, successive_halving or none; `pruner_args` go to its Optuna class.
        storage: An Optuna RDB URL; None: `default_storage` of the tracking URI.
        heartbeat_interval: Seconds between a running trial's heartbeats in the storage.
        grace_period: Seconds without a heartbeat after which a trial's worker counts as dead
            (None: Optuna's default, twice the interval); its trial is then FAIL, and run again once.
    """

    params: dict[str, ParamSpec]
    n_trials: int = 20
    metric: str = "val/loss"
    direction: str = "minimize"
    pruner: str = "median"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    storage: str | None = None
    heartbeat_interval: int = 60
    grace_period: int | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> TuneSpec:
        """The ``tune:`` block of a study; anything wrong is a ConfigError naming the key and the fix."""
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{where}: {msg}")

        if not isinstance(raw, dict):
            raise bad("'tune' must be a mapping with n_trials, metric, direction, pruner, storage and params")
        allowed = set(cls.__dataclass_fields__)
        if unknown := set(raw) - allowed:
            raise bad(f"unknown tune key(s) {sorted(unknown)}; valid keys: {sorted(allowed)}")
        n = raw.get("n_trials", cls.n_trials)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad(f"tune.n_trials must be an integer >= 1, got {n!r}")
        if raw.get("direction", cls.direction) not in ("minimize", "maximize"):
            raise bad(f"tune.direction must be 'minimize' or 'maximize', got {raw['direction']!r}")
        if not isinstance(raw.get("metric", cls.metric), str):
            raise bad(f"tune.metric must be a metric key such as 'val/loss', got {raw['metric']!r}")
        pruner, pruner_args = raw.get("pruner", cls.pruner), raw.get("pruner_args") or {}
        if pruner not in PRUNERS:
            raise bad(f"tune.pruner must be one of {sorted(PRUNERS)}, got {pruner!r}")
        accepted = set(inspect.signature(PRUNERS[pruner]).parameters)
        if not isinstance(pruner_args, dict) or set(pruner_args) - accepted:
            raise bad(f"tune.pruner_args for '{pruner}' takes {sorted(accepted) or 'nothing'}, got {pruner_args!r}")
        try:
            PRUNERS[pruner](**pruner_args)
        except (TypeError, ValueError) as e:
            raise bad(f"tune.pruner_args: {e}") from None
        storage = raw.get("storage")
        if storage is not None and (not isinstance(storage, str) or "://" not in storage):
            raise bad(f"tune.storage must be null (the default SQLite file) or a URL such as "
                      f"postgresql://user:pass@host/db, got {storage!r}")
        params = raw.get("params")
        if not isinstance(params, dict) or not params:
            raise bad("tune.params must map dotted config keys to ranges, e.g. "
                      "{model.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}")
        beat, grace = raw.get("heartbeat_interval", cls.heartbeat_interval), raw.get("grace_period")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (beat, grace or 1)):
            raise bad(f"tune.heartbeat_interval and tune.grace_period are whole seconds >= 1, got {beat!r}, {grace!r}")
        return cls({k: _param(v, f"{where}: tune.params.{k}") for k, v in params.items()}, n,
                   raw.get("metric", cls.metric), raw.get("direction", cls.direction), pruner, pruner_args, storage,
                   beat, grace)


TAG_TRIAL_OF = "practicum.trial_of"


def _param(raw: Any, where: str) -> ParamSpec:
    fix = "give {low: L, high: H} with L < H, optionally log: true (needs L > 0) and type: int"
    if not isinstance(raw, dict) or set(raw) - {"low", "high", "log", "type"} or not {"low", "high"} <= set(raw):
        raise ConfigError(f"{where}: {fix}; got {raw!r}")
    p = ParamSpec(**raw)
    if not isinstance(p.log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {p.log!r}")
    if p.type not in ("float", "int"):
        raise ConfigError(f"{where}: type must be 'float' or 'int', got {p.type!r}")
    nums = (p.low, p.high)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in nums) or p.low >= p.high:
        raise ConfigError(f"{where}: low must be a number below high, got low={p.low!r}, high={p.high!r}; {fix}")
    if p.log and p.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low={p.low!r}; raise low or drop log")
    if p.type == "int" and not all(float(x).is_integer() for x in nums):
        raise ConfigError(f"{where}: an int range needs whole bounds, got low={p.low!r}, high={p.high!r}")
    return p


def default_storage(uri: str) -> str:
    """The Optuna storage of a study that names none: a SQLite file beside the tracking store."""
    return f"sqlite:///{trk.local_dir(uri) / 'optuna.db'}"


class TrialPruning(Callback):
    """Reports `metric` to the trial after every validation; stops training when the pruner gives up.

    Stopping (rather than raising Optuna's TrialPruned) lets the run end FINISHED with its metrics and
    checkpoints logged like any other run; `pruned` tells the tuner what happened. Single-process
    trials only: under DDP every rank would need the same verdict broadcast.
    """

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric, self.pruned = trial, metric, False

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        self.trial.report(float(trainer.callback_metrics[self.metric]), trainer.global_step)
        if self.trial.should_prune():
            self.pruned = trainer.should_stop = True


def tune_variant(study_name: str, variant: str, config: Path, args: list[str], spec: TuneSpec, uri: str, *,
                 parent_run_id: str, experiment: str, seed: int = 0, system_metrics: bool = True,
                 progress=None, record: bool = True) -> dict:
    """Run the variant's missing trials, then (`record`) record the best on the parent run.

    A study's tuning workers pass ``record=False``: each would record the best of the trials finished
    so far, and a second worker's different best is a param MLflow refuses to change. The study records
    once, after every worker is done.

    Returns ``{"best_params", "best_value", "n_trials" (finished ones in the storage), "trials_run_now"}``;
    ``best_value`` is NaN and ``best_params`` empty while no trial has completed. `progress`: a
    callback that shows each trial's progress instead of Lightning's bar (a study's progress line).
    """
    from pipelines.config import PracticumCLI, to_cli_args

    # Keys and types are checked once, before any trial: a typo must not spend the budget on FAILs.
    PracticumCLI(["--config", str(config), *args, *to_cli_args({k: p.low for k, p in spec.params.items()})])
    study = _open_study(spec.storage or default_storage(uri), f"{study_name}/{variant}", spec)
    _claim_search(study, search_of(config, args, spec), spec.storage or default_storage(uri))
    optuna.storages.fail_stale_trials(study)  # dead workers' trials: FAIL, their params queued again
    # Not the variant tag: the runs table groups by it, and trials at other learning rates would be
    # averaged in with the seeded runs. `practicum.trial_of` finds a variant's trials.
    tags = {trk.TAG_STUDY: study_name, trk.TAG_ROLE: "trial", TAG_TRIAL_OF: variant}
    ran = []

    def objective(trial: optuna.Trial) -> float:
        """One trial as one pipeline run: its value, or TrialPruned / TrialFailed for Optuna to record."""
        from pipelines.run import run_experiment

        ran.append(trial.number)
        # Seeded by trial number, not once per process: a resumed study, or a second worker, draws new
        # points instead of replaying the first trials' ones, and one worker's search stays reproducible.
        study.sampler = optuna.samplers.TPESampler(seed=seed + trial.number)
        params = {k: p.suggest(trial, k) for k, p in spec.params.items()}
        pruning = TrialPruning(trial, spec.metric)
        try:
            res = run_experiment(config, [*args, *to_cli_args(params)], uri, experiment=experiment,
                                 run_name=f"{variant}/trial-{trial.number}", parent_run_id=parent_run_id,
                                 tags={**tags, "practicum.trial": str(trial.number)},
                                 system_metrics=system_metrics, callbacks=[pruning, *([progress] if progress else [])],
                                 progress_bar=progress is None)
        except ConfigError as e:  # a point of the space the model refuses (keys were checked up front): a FAIL
            trial.set_user_attr("practicum.error", str(e)[:1000])
            raise TrialFailed(str(e)) from None
        except BaseException:  # the tracking store went away, or Ctrl-C between runs: not the params' doing
            trial.set_user_attr(UNCOUNTED, "interrupted")
            raise
        value = res.metrics.get(spec.metric)
        state = TrialState.FAIL
        if res.status == "KILLED":  # Ctrl-C or SIGTERM: the slot goes back to the budget, tuning stops
            trial.set_user_attr(UNCOUNTED, "interrupted")
            study.stop()
        elif pruning.pruned:
            state = TrialState.PRUNED
        elif res.status == "FINISHED" and value is not None and math.isfinite(value):
            state = TrialState.COMPLETE
        if res.run_id:
            trk.MlflowClient(uri).set_tag(res.run_id, "practicum.trial_state", state.name)
        if state == TrialState.PRUNED:
            raise optuna.TrialPruned()
        if state == TrialState.FAIL:
            raise TrialFailed(f"run {res.run_id} ended {res.status} with {spec.metric}={value}")
        return value

    # Trials given back (interrupted, or failed stale and queued again) do not spend the budget.
    budget = spec.n_trials + len(_given_back(study))
    if _spent(study) < budget:
        study.optimize(objective, catch=(TrialFailed,),
                       callbacks=[optuna.study.MaxTrialsCallback(budget, states=SPENT)])

    given_back = _given_back(study)
    finished = [t for t in study.get_trials(deepcopy=False, states=SPENT[:3]) if t.number not in given_back]
    try:
        best_params, best_value = study.best_trial.params, study.best_trial.value
    except ValueError:  # no COMPLETE trial yet
        best_params, best_value = {}, float("nan")
    result = {"best_params": best_params, "best_value": best_value, "n_trials": len(finished),
              "trials_run_now": len(ran)}
    if record:
        client = trk.MlflowClient(uri)
        client.log_text(parent_run_id, json.dumps(result, indent=2), f"tune/{variant}.json")
        trk.log_params(client, parent_run_id, {f"tune.{variant}.{k}": v for k, v in best_params.items()})
    return result


class TrialFailed(Exception):
    """A trial whose run crashed, diverged or was refused: Optuna records it FAIL and tuning goes on."""


SEARCH = "practicum.search"  # the Optuna study's user attr: what its trials searched, and on what


def search_of(config: Path, args: list[str], spec: TuneSpec) -> dict:
    """What makes two searches the same: the space, the objective, the variant's overrides and its config
    file (a digest of the text). Trials of another search are not this one's, whatever the name says."""
    return {"params": {k: dataclasses.asdict(p) for k, p in spec.params.items()}, "metric": spec.metric,
            "direction": spec.direction, "args": list(args),
            "config": hashlib.sha256(Path(config).read_bytes()).hexdigest()[:16]}


def _claim_search(study: optuna.Study, search: dict, storage: str) -> None:
    """The study in the storage is this search's, or an error before any trial: re-running a study
    after changing a range (or the variant, or its config) would otherwise reuse the old search's trials
    and its best as this one's, and run nothing (the budget is spent). A study created before this
    record existed is adopted."""
    held = study.user_attrs.get(SEARCH)
    if held is None:
        study.set_user_attr(SEARCH, search)  # a second worker starting at once writes the same value
        return
    if held == search:
        return
    changed = [k for k in search if held.get(k) != search[k]]
    detail = "; ".join(f"{k}: was {held.get(k)!r}, now {search[k]!r}" for k in changed if k not in ("config", "args"))
    detail += "".join(f"; {k} changed" for k in changed if k in ("config", "args"))
    shown = _shown(storage)
    raise ConfigError(
        f"tuning '{study.study_name}': the Optuna storage {shown} holds a search of that name over something "
        f"else ({detail.lstrip('; ')}), and its {len(study.trials)} trial(s) would be taken as this one's. Start "
        f"afresh: optuna delete-study --study-name '{study.study_name}' --storage '{shown}', or set the study's "
        "tune.storage to another database, or give the study another name:")


def _shown(storage: str) -> str:
    """The storage URL as an error may print it: without its password."""
    import sqlalchemy

    return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)


def _open_study(storage: str, name: str, spec: TuneSpec, attempts: int = 3) -> optuna.Study:
    """The study in `storage`, created by whichever worker comes first."""
    import sqlalchemy

    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver Practicum installs is psycopg2.
    storage = re.sub(r"^postgresql://", "postgresql+psycopg2://", storage)
    for attempt in range(attempts):
        try:
            # A worker that dies (SIGKILL, the OOM killer, a lost machine) stops beating; after the grace
            # period its trial is FAIL and its params are queued once more.
            rdb = optuna.storages.RDBStorage(
                storage, engine_kwargs=SQLITE_WAIT if storage.startswith("sqlite") else None,
                heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            return optuna.create_study(storage=rdb, study_name=name, direction=spec.direction,
                                       pruner=PRUNERS[spec.pruner](**spec.pruner_args), load_if_exists=True)
        except sqlalchemy.exc.SQLAlchemyError as e:
            # Workers starting at once on a fresh storage race to create its tables; the loser finds them next time.
            if attempt == attempts - 1:
                shown = _shown(storage)
                raise trk.TrackingError(f"Optuna storage '{shown}' is not usable: {str(e).splitlines()[0][:300]}. "
                                        "Check tune.storage (a reachable database URL) or leave it null.") from None
            time.sleep(1.0 + attempt)


def _spent(study: optuna.Study) -> int:
    """Trials that use up the budget (finished or running), before the given-back ones are added to it."""
    return len(study.get_trials(deepcopy=False, states=SPENT))


def _given_back(study: optuna.Study) -> set[int]:
    """Numbers of the trials that do not count: interrupted ones, and stale ones queued again (their retry counts)."""
    trials = study.get_trials(deepcopy=False)
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    return {t.number for t in trials if UNCOUNTED in t.user_attrs or t.number in retried}
