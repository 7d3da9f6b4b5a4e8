"""Budgeted search on the toy project: trials are real pipeline runs, the budget lives in Optuna's storage."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipelines.tracking import ConfigError, TrackingError
from pipelines.tune import TuneSpec, default_storage, tune_variant
from tests.pipelines.toy import TOY
from tests.pipelines.toy import HOOKS

ROOT = Path(__file__).resolve().parents[2]
LR = {"low": 1.0e-3, "high": 1.0e-1, "log": True}
QUICK = ["--system_metrics=false"]


@pytest.fixture
def parent(tracking_uri) -> str:
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("toy-study")
    return client.create_run(exp, run_name="toy-study", tags={"practicum.role": "parent"}).info.run_id


def spec(**kw) -> TuneSpec:
    return TuneSpec.from_dict({"n_trials": 3, "pruner": "none", "params": {"model.init_args.lr": LR}, **kw}, "test")


def trial_runs(uri: str, parent_id: str | None = None):
    client = MlflowClient(uri)
    where = "tags.`practicum.role` = 'trial'" + (f" and tags.`mlflow.parentRunId` = '{parent_id}'" if parent_id else "")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], where)


@pytest.mark.parametrize("raw, message", [
    ({"n_trails": 3, "params": {"x": LR}}, r"unknown tune key\(s\) \['n_trails'\]; valid keys: .*'n_trials'"),
    ({"n_trials": 0, "params": {"x": LR}}, r"tune.n_trials must be an integer >= 1, got 0"),
    ({"direction": "min", "params": {"x": LR}}, r"tune.direction must be 'minimize' or 'maximize', got 'min'"),
    ({"pruner": "hyperband", "params": {"x": LR}}, r"tune.pruner must be one of \[.median., .none.*got .hyperband."),
    ({"pruner_args": {"patience": 2}, "params": {"x": LR}}, r"tune.pruner_args for 'median' takes .*'n_startup"),
    ({"storage": "optuna.db", "params": {"x": LR}}, r"tune.storage must be null .* or a URL such as postgresql://"),
    ({"params": {}}, r"tune.params must map dotted config keys to ranges"),
    ({"params": {"x": {"low": 0.1, "high": 0.01}}}, r"tune.params.x: low must be a number below high"),
    ({"params": {"x": {"low": 0, "high": 1, "log": True}}}, r"tune.params.x: a log range needs low > 0"),
    ({"params": {"x": {"low": 1, "hi": 2}}}, r"tune.params.x: give \{low: L, high: H\}"),
    ({"params": {"x": {"low": 1.5, "high": 8, "type": "int"}}}, r"tune.params.x: an int range needs whole bounds"),
    ({"params": {"x": {"low": 1, "high": 8, "type": "cat"}}}, r"tune.params.x: type must be 'float' or 'int'"),
    ({"params": {"x": {"low": 1, "high": 8, "log": "yes"}}}, r"tune.params.x: log must be true or false"),
])
def test_bad_tune_block_names_the_key_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=rf"^study s.yaml, variant 'v': {message}"):
        TuneSpec.from_dict(raw, "study s.yaml, variant 'v'")


def test_tune_runs_trials_as_children_and_a_rerun_runs_none(toy_config, tracking_uri, parent):
    s = spec(params={"model.init_args.lr": LR, "model.init_args.hidden": {"low": 2, "high": 16, "type": "int"}})
    kw = dict(parent_run_id=parent, experiment="toy-study", system_metrics=False)
    res = tune_variant("toy-study", "narrow", toy_config, QUICK, s, tracking_uri, **kw)
    assert res["n_trials"] == res["trials_run_now"] == 3

    runs = trial_runs(tracking_uri, parent)
    assert sorted(r.data.tags["practicum.trial"] for r in runs) == ["0", "1", "2"]
    for r in runs:
        t = r.data.tags
        assert "practicum.variant" not in t  # grouping the runs table by variant shows seeded runs only
        assert (t["practicum.trial_of"], t["practicum.study"], t["practicum.trial_state"]) == ("narrow", "toy-study",
                                                                                               "COMPLETE")
        assert r.info.run_name == f"narrow/trial-{t['practicum.trial']}" and r.info.status == "FINISHED"

    # The best is the storage's best COMPLETE trial, and that trial's run logged the same params and value.
    study = optuna.load_study(study_name="toy-study/narrow", storage=default_storage(tracking_uri))
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert res["best_params"] == best.params and res["best_value"] == best.value
    run = next(r for r in runs if r.data.tags["practicum.trial"] == str(best.number))
    assert float(run.data.params["model.init_args.lr"]) == pytest.approx(best.params["model.init_args.lr"])
    assert run.data.params["model.init_args.hidden"] == str(best.params["model.init_args.hidden"])
    assert run.data.metrics["val/loss"] == pytest.approx(best.value)

    # the parent's record names the same best as the storage and the trial runs (not only what tune_variant returned)
    client = MlflowClient(tracking_uri)
    logged = json.loads(Path(client.download_artifacts(parent, "tune/narrow.json")).read_text())
    assert logged["best_params"] == best.params and logged["best_value"] == pytest.approx(run.data.metrics["val/loss"])
    assert logged["n_trials"] == len(runs) == 3
    assert client.get_run(parent).data.params["tune.narrow.model.init_args.hidden"] == str(best.params[
        "model.init_args.hidden"])

    again = tune_variant("toy-study", "narrow", toy_config, QUICK, s, tracking_uri, **kw)
    assert again["trials_run_now"] == 0 and again["best_params"] == res["best_params"] and again["n_trials"] == 3
    assert len(trial_runs(tracking_uri)) == 3


def test_a_changed_search_under_the_same_name_is_refused_before_any_trial(toy_config, tracking_uri, parent):
    """optimizers re-run after widening AdamW's range: the storage's study of that name held the old
    range's 6 trials, and the re-run took their best as its own and ran nothing. Now it is an error that
    names what changed and how to start afresh; the same search again still runs nothing new."""
    kw = dict(parent_run_id=parent, experiment="toy-study", system_metrics=False)
    first = tune_variant("toy-study", "narrow", toy_config, QUICK, spec(n_trials=1), tracking_uri, **kw)
    assert first["trials_run_now"] == 1
    wider = spec(n_trials=1, params={"model.init_args.lr": {**LR, "high": 0.3}})
    with pytest.raises(ConfigError, match=r"tuning 'toy-study/narrow': .* holds a search of that name over something "
                                          r"else \(params: was .*'high': 0.1.*now .*'high': 0.3.*optuna delete-study"):
        tune_variant("toy-study", "narrow", toy_config, QUICK, wider, tracking_uri, **kw)
    with pytest.raises(ConfigError, match=r"args changed"):  # the variant's overrides are part of the search
        tune_variant("toy-study", "narrow", toy_config, [*QUICK, "--trainer.max_steps=6"], spec(n_trials=1),
                     tracking_uri, **kw)
    assert len(trial_runs(tracking_uri)) == 1
    again = tune_variant("toy-study", "narrow", toy_config, QUICK, spec(n_trials=1), tracking_uri, **kw)
    assert again["trials_run_now"] == 0 and again["best_params"] == first["best_params"]


def test_maximize_keeps_the_trial_with_the_highest_value(toy_config, tracking_uri, parent):
    """direction: maximize reaches Optuna and the best: here the worst loss, so a minimising search would pick
    another trial (the learning rates span 1e-5..0.1, whose val/loss differ by orders of magnitude)."""
    s = spec(direction="maximize", params={"model.init_args.lr": {"low": 1.0e-5, "high": 0.1, "log": True}})
    res = tune_variant("toy-study", "max", toy_config, QUICK, s, tracking_uri, parent_run_id=parent,
                       experiment="toy-study", system_metrics=False)
    study = optuna.load_study(study_name="toy-study/max", storage=default_storage(tracking_uri))
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    losses = {float(r.data.params["model.init_args.lr"]): r.data.metrics["val/loss"]
              for r in trial_runs(tracking_uri, parent)}
    assert len(losses) == 3 and max(losses.values()) > min(losses.values())
    assert res["best_value"] == pytest.approx(max(losses.values()))
    best_lr = max(losses, key=losses.get)
    assert res["best_params"]["model.init_args.lr"] == pytest.approx(best_lr)


def test_bad_region_is_pruned_and_stops_early(toy_config, tracking_uri, parent):
    # Two good learning rates complete first; the third, far too small, trails their median at step 4.
    study = optuna.create_study(study_name="toy-study/prune", storage=default_storage(tracking_uri))
    for lr in (0.05, 0.03, 1.0e-5):
        study.enqueue_trial({"model.init_args.lr": lr})
    s = spec(pruner="median", pruner_args={"n_startup_trials": 2},
             params={"model.init_args.lr": {"low": 1.0e-5, "high": 0.1, "log": True}})
    res = tune_variant("toy-study", "prune", toy_config, QUICK, s, tracking_uri, parent_run_id=parent,
                       experiment="toy-study", system_metrics=False)
    assert res["n_trials"] == 3 and res["best_params"] == {"model.init_args.lr": 0.05}

    study = optuna.load_study(study_name="toy-study/prune", storage=default_storage(tracking_uri))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    pruned = next(r for r in trial_runs(tracking_uri, parent) if r.data.tags["practicum.trial"] == "2")
    assert pruned.data.tags["practicum.trial_state"] == "PRUNED" and pruned.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(pruned.info.run_id, "train/loss")]
    assert max(steps) < TOY["trainer"]["max_steps"] // 2  # stopped at the first validation (step 4) of 12


def test_failed_trials_are_counted_and_tuning_goes_on(toy_config, tracking_uri, parent):
    study = optuna.create_study(study_name="toy-study/crash", storage=default_storage(tracking_uri))
    # a crash mid-fit, a value the model refuses before any run opens, then a good one
    for step, lr in ((5, 0.01), (100, -0.01), (100, 0.01)):
        study.enqueue_trial({"model.init_args.fail_at_step": step, "model.init_args.lr": lr})
    s = spec(params={"model.init_args.fail_at_step": {"low": 1, "high": 100, "type": "int"},
                     "model.init_args.lr": {"low": -0.1, "high": 0.1}})
    res = tune_variant("toy-study", "crash", toy_config, QUICK, s, tracking_uri, parent_run_id=parent,
                       experiment="toy-study", system_metrics=False)
    assert (res["n_trials"], res["trials_run_now"]) == (3, 3)
    assert res["best_params"] == {"model.init_args.fail_at_step": 100, "model.init_args.lr": 0.01}
    study = optuna.load_study(study_name="toy-study/crash", storage=default_storage(tracking_uri))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert "lr must be > 0" in study.trials[1].user_attrs["practicum.error"]
    runs = sorted(trial_runs(tracking_uri, parent), key=lambda r: r.data.tags["practicum.trial"])
    assert [(r.data.tags["practicum.trial"], r.info.status, r.data.tags["practicum.trial_state"]) for r in runs] == [
        ("0", "FAILED", "FAIL"), ("2", "FINISHED", "COMPLETE")]


def test_interrupted_trial_gives_its_slot_back(toy_config, tracking_uri, parent, monkeypatch):
    """Ctrl-C in a trial stops tuning; it says nothing about the params, so a re-run runs the whole budget."""
    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setitem(HOOKS, 3, ctrl_c)
    args = [*QUICK, "--trainer.callbacks=[{class_path: tests.pipelines.toy.CallAt}]"]
    kw = dict(parent_run_id=parent, experiment="toy-study", system_metrics=False)
    res = tune_variant("toy-study", "v", toy_config, args, spec(n_trials=2), tracking_uri, **kw)
    assert (res["trials_run_now"], res["n_trials"]) == (1, 0)
    (run,) = trial_runs(tracking_uri, parent)
    assert run.info.status == "KILLED" and run.data.tags["practicum.trial_state"] == "FAIL"

    HOOKS.clear()
    res = tune_variant("toy-study", "v", toy_config, args, spec(n_trials=2), tracking_uri, **kw)
    assert (res["trials_run_now"], res["n_trials"]) == (2, 2)


def test_unreachable_storage_is_named_without_its_password(toy_config, tracking_uri, parent, monkeypatch):
    monkeypatch.setattr("pipelines.tune.time.sleep", lambda s: None)
    s = spec(storage="postgresql://tuner:s3cret@127.0.0.1:1/optuna")  # nothing listens on port 1
    shown = r"postgresql\+psycopg2://tuner:\*\*\*@127.0.0.1:1/optuna"
    with pytest.raises(TrackingError, match=rf"Optuna storage '{shown}' is not usable: .*Check tune.storage") as e:
        tune_variant("toy-study", "v", toy_config, QUICK, s, tracking_uri, parent_run_id=parent,
                     experiment="toy-study", system_metrics=False)
    assert "s3cret" not in str(e.value)


def test_trial_of_a_dead_worker_is_failed_and_its_params_run_again(toy_config, tracking_uri, parent):
    """A worker killed outright stops beating: after the grace period its trial is FAIL, and the next worker
    runs the same params again in its slot (Optuna's heartbeat and RetryFailedTrialCallback)."""
    storage = optuna.storages.RDBStorage(default_storage(tracking_uri), heartbeat_interval=1)
    study = optuna.create_study(study_name="toy-study/v", storage=storage)
    dead = study.ask()
    lr = dead.suggest_float("model.init_args.lr", LR["low"], LR["high"], log=True)
    storage.record_heartbeat(dead._trial_id)  # its last beat; then the process is gone
    time.sleep(3.5)  # past the 2 s grace with room: a loaded machine (two xdist workers) delays the check
    res = tune_variant("toy-study", "v", toy_config, QUICK, spec(n_trials=2, heartbeat_interval=1, grace_period=2),
                       tracking_uri, parent_run_id=parent, experiment="toy-study", system_metrics=False)
    trials = optuna.load_study(study_name="toy-study/v", storage=default_storage(tracking_uri)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params["model.init_args.lr"] == lr  # the retry: the dead trial's point, not a new draw
    assert (res["trials_run_now"], res["n_trials"]) == (2, 2)  # the dead trial gave its slot to its retry


def test_a_heartbeat_must_be_whole_seconds():
    with pytest.raises(ConfigError, match="heartbeat_interval and tune.grace_period are whole seconds"):
        spec(heartbeat_interval=0.5)


WORKER = """
import json, os, sys, time
from pathlib import Path
from mlflow import MlflowClient
from pipelines.tune import TuneSpec, tune_variant
uri, config, spec, ready = sys.argv[1], sys.argv[2], TuneSpec.from_dict(json.loads(sys.argv[3]), "w"), Path(sys.argv[4])
client = MlflowClient(uri)
parent = client.create_run(client.get_experiment_by_name("toy-study").experiment_id).info.run_id
import pipelines.run
run = pipelines.run.run_experiment
def together(*a, **k):  # each worker holds its first trial until the other holds one too: both really run
    (ready / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(ready.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    return run(*a, **k)
pipelines.run.run_experiment = together
print(json.dumps(tune_variant("toy-study", "v", config, ["--system_metrics=false"], spec, uri,
                              parent_run_id=parent, experiment="toy-study", system_metrics=False)))
"""


@pytest.mark.slow
def test_two_workers_share_one_budget(toy_config, tracking_uri, parent, tmp_path):
    """Two processes on one storage, as two machines on one PostgreSQL: together exactly n_trials."""
    raw = {"n_trials": 4, "pruner": "none", "params": {"model.init_args.lr": LR}}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "ready").mkdir()
    cmd = [sys.executable, "-c", WORKER, tracking_uri, str(toy_config), json.dumps(raw), str(tmp_path / "ready")]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outs = [w.communicate(timeout=240) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-6000:].replace('^', '') for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    study = optuna.load_study(study_name="toy-study/v", storage=default_storage(tracking_uri))
    states = [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    assert sum(r["trials_run_now"] for r in results) == 4, (results, states)
    runs = trial_runs(tracking_uri)
    assert len(runs) == len({r.data.tags["practicum.trial"] for r in runs}) == 4
    counted = [t for t in study.trials if "practicum.uncounted" not in t.user_attrs]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted), states
    assert all(r["trials_run_now"] >= 1 for r in results), results  # both workers really ran trials


def test_a_tuning_worker_records_nothing_and_the_study_records_the_final_best_once(toy_config, tracking_uri, parent):
    """Workers of one search finish at different times, each seeing a different best so far; if each
    recorded it, the second param would differ and MLflow refuses to change a logged param (seen
    with --workers 2 on peft-methods). Only the final, recording call writes to the parent."""
    kw = dict(parent_run_id=parent, experiment="toy-study", system_metrics=False)
    client = MlflowClient(tracking_uri)
    first = tune_variant("toy-study", "w", toy_config, QUICK, spec(n_trials=1), tracking_uri, record=False, **kw)
    assert first["n_trials"] == 1
    assert not any(k.startswith("tune.") for k in client.get_run(parent).data.params)
    assert not client.list_artifacts(parent, "tune")
    second = tune_variant("toy-study", "w", toy_config, QUICK, spec(n_trials=3), tracking_uri, record=False, **kw)
    assert second["n_trials"] == 3 and not client.list_artifacts(parent, "tune")
    final = tune_variant("toy-study", "w", toy_config, QUICK, spec(n_trials=3), tracking_uri, **kw)
    assert final["trials_run_now"] == 0
    assert float(client.get_run(parent).data.params["tune.w.model.init_args.lr"]) == pytest.approx(
        final["best_params"]["model.init_args.lr"])
