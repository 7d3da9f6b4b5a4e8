"""A study on many workers: the same metrics serially, on local workers and on Ray; a worker killed
mid-run; --resume after Ctrl-C; several processes writing one SQLite store at once."""

import multiprocessing
import os

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.study import run_study
from tests.pipelines.toy import HOOKS, TOY

QUICK = ["--system_metrics=false"]
COLUMNS = ["variant", "seed", "status", "val/loss", "test/loss", "train/loss"]


@pytest.fixture
def study_file(tmp_path):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(TOY))
    study = {"name": "toy-workers", "base": "toy.yaml", "seeds": [0, 1], "columns": ["val/loss", "test/loss", "train/loss"],
             "variants": {"narrow": {"model.init_args.hidden": 4}, "wide": {"model.init_args.hidden": 16}}}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study, sort_keys=False))
    return p


def children(uri: str, parent_id: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def table(t):
    return t.runs[COLUMNS].sort_values(["variant", "seed"]).reset_index(drop=True)


@pytest.mark.slow(seconds=43)
def test_serial_workers_and_ray_log_the_same_metrics(study_file, tracking_uri, tmp_path):
    """Where a run ran does not change what it logged: serial, two local workers, a local Ray instance."""
    _, serial = run_study(study_file, QUICK, tracking_uri)
    tables = {"serial": table(serial)}
    for mode, kw in {"workers": {"workers": 2}, "ray": {"ray": True}}.items():
        parent, t = run_study(study_file, QUICK, f"sqlite:///{tmp_path}/{mode}.db", **kw)
        tables[mode] = table(t)
        workers = {r.data.tags["practicum.worker"] for r in children(f"sqlite:///{tmp_path}/{mode}.db", parent)}
        assert len(workers) == 2, (mode, workers)  # the runs really went to two processes
    for mode in ("workers", "ray"):
        assert list(tables[mode]["status"]) == ["FINISHED"] * 4
        for c in ("val/loss", "test/loss", "train/loss"):
            np.testing.assert_allclose(tables[mode][c], tables["serial"][c], rtol=0, atol=1e-6, err_msg=f"{mode} {c}")


@pytest.mark.slow(seconds=29)
def test_a_worker_killed_mid_run_is_resumed_into_its_run(study_file, tracking_uri, tmp_path):
    """SIGKILL a worker at step 6 (after the step-4 checkpoint): the study goes on, and the run continues
    from its checkpoint in the same MLflow run. (Its metrics are not those of an uninterrupted run: the
    toy's shuffled loader cannot resume mid-epoch, so the steps after the checkpoint see other batches.)"""
    raw = yaml.safe_load(study_file.read_text())
    raw["overrides"] = {"trainer.callbacks": [{"class_path": "tests.pipelines.toy.SignalAt", "init_args": {
        "step": 6, "sig": "SIGKILL", "once": str(tmp_path / "killed")}}]}
    raw["variants"] = {"narrow": {"model.init_args.hidden": 4}}
    study_file.write_text(yaml.safe_dump(raw))
    parent, t = run_study(study_file, QUICK, tracking_uri, workers=2)
    assert (tmp_path / "killed").exists()  # a worker did die
    runs = children(tracking_uri, parent)
    assert sorted(r.data.tags["practicum.job"] for r in runs) == ["narrow seed=0", "narrow seed=1"]  # one run a job
    assert all(r.info.status == "FINISHED" for r in runs)
    assert any("practicum.resumed_from" in r.data.tags for r in runs)  # continued, not started again

    client = MlflowClient(tracking_uri)
    for r in runs:  # every run reached the end, its steps logged once each across the restart
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert sorted(steps) == [1, 3, 5, 7, 9, 11], steps  # train/loss every 2 of the 12 steps
    assert list(t.summary["n"]) == [2]


def test_resume_after_ctrl_c_runs_only_what_is_missing(study_file, tracking_uri, monkeypatch):
    """Ctrl-C in the second run stops the study; --resume continues that run from its checkpoint and runs
    the two never started; the finished first run is left as it was."""
    calls = []

    def ctrl_c_in_the_second_run():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setitem(HOOKS, 6, ctrl_c_in_the_second_run)
    args = [*QUICK, "--trainer.callbacks=[{class_path: tests.pipelines.toy.CallAt}]"]
    parent, _ = run_study(study_file, args, tracking_uri)
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent).info.status == "KILLED"
    before = {r.data.tags["practicum.job"]: r for r in children(tracking_uri, parent)}
    assert {k: r.info.status for k, r in before.items()} == {"narrow seed=0": "FINISHED", "narrow seed=1": "KILLED"}

    HOOKS.clear()
    again, t = run_study(study_file, args, tracking_uri, resume=True)
    assert again == parent and client.get_run(parent).info.status == "FINISHED"
    after = {r.data.tags["practicum.job"]: r for r in children(tracking_uri, parent)}
    assert sorted(after) == ["narrow seed=0", "narrow seed=1", "wide seed=0", "wide seed=1"]
    assert all(r.info.status == "FINISHED" for r in after.values())
    first, second = before["narrow seed=0"], after["narrow seed=1"]
    assert after["narrow seed=0"].info.end_time == first.info.end_time  # not run again
    assert second.info.run_id == before["narrow seed=1"].info.run_id and "practicum.resumed_from" in second.data.tags
    assert list(t.summary["n"]) == [2, 2]


def _write(uri: str, exp_id: str, worker: int, n: int) -> str:
    client = MlflowClient(uri)
    run = client.create_run(exp_id, run_name=f"writer-{worker}")
    for step in range(n):
        client.log_metric(run.info.run_id, "m", float(worker * 1000 + step), step=step)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_several_processes_write_one_sqlite_store_and_lose_nothing(tracking_uri):
    """Four processes log 150 metrics each, one transaction per metric, into one SQLite store at once:
    no 'database is locked', every value there (MLflow waits up to 20 s for SQLite's write lock)."""
    exp = MlflowClient(tracking_uri).create_experiment("writers")
    n = 150
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        run_ids = pool.starmap(_write, [(tracking_uri, exp, w, n) for w in range(4)])
    client = MlflowClient(tracking_uri)
    for w, run_id in enumerate(run_ids):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "m"))
        assert history == [(s, float(w * 1000 + s)) for s in range(n)]
        assert client.get_run(run_id).info.status == "FINISHED"
    assert os.path.exists(tracking_uri.removeprefix("sqlite:///"))


@pytest.mark.slow(seconds=40)
def test_sigterm_to_a_study_stops_its_workers_and_their_runs_end_killed(study_file, tracking_uri):
    """`kill PID` (or `timeout`, a scheduler) signals the study's process alone, not its group as a
    terminal's Ctrl-C does: the workers must be stopped by the study, their runs end KILLED (so
    --resume continues them), and no worker outlives it (before: one lived on for two hours, PPID 1)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.helpers import ROOT

    raw = yaml.safe_load(study_file.read_text())
    raw["seeds"] = [0]
    raw["overrides"] = {"trainer.max_steps": 1_000_000, "trainer.limit_val_batches": 0}  # runs that do not end
    study_file.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "study", str(study_file), "--workers", "2",
                             "--tracking_uri", tracking_uri, *QUICK], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    client, tree = MlflowClient(tracking_uri), []
    try:
        deadline, running = time.monotonic() + 240, []
        while time.monotonic() < deadline and len(running) < 2:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
            exps = [e.experiment_id for e in client.search_experiments()]
            running = client.search_runs(exps, "tags.`practicum.job` LIKE '%seed=0' and attributes.status = 'RUNNING'") \
                if exps else []
        assert len(running) == 2, "both runs never started"
        tree = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in tree if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, [" ".join(p.cmdline()) for p in tree]
        proc.send_signal(signal.SIGTERM)  # to the study alone
        out, _ = proc.communicate(timeout=180)
        _, alive = psutil.wait_procs(tree, timeout=15)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
        assert "SIGTERM: stopping the runs in flight" in out, out[-3000:]
        ends = {r.info.run_name: r.info.status for r in (client.get_run(r.info.run_id) for r in running)}
        assert ends == {"narrow seed=0": "KILLED", "wide seed=0": "KILLED"}, ends
    finally:  # whatever failed above, nothing of the study outlives the test
        if proc.poll() is None:
            tree = [*tree, *psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
