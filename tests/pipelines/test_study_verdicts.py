"""A study's verdict from seeds and intervals: pure seed noise gets "inconclusive" (no margin
declared), a learning rate 100x too small gets "worse", both from the real pipeline; a re-run
reproduces the table; the statistics and the table's units against hand computations."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from pipelines import stats as st
from pipelines.compare import human
from pipelines.tables import people_table, render
from pipelines.study import load_study, run_study
from pipelines.tracking import ConfigError
from tests.pipelines.toy import TOY


@pytest.fixture
def seeded_study(tmp_path):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({**TOY, "trainer": {**TOY["trainer"], "max_steps": 12}}))
    study = {
        "name": "toy-verdicts", "base": "toy.yaml", "primary_metric": "val/loss", "baseline": "base",
        "seeds": [0, 1, 2, 3, 4], "columns": ["val/loss", "test/loss"], "quick": True,
        "variants": {
            "base": {},
            "reseeded": {"model.init_args.init_shift": 1000},  # the same model under other random numbers
            "lr-100x-small": {"model.init_args.lr": 1.0e-4},
        },
    }
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study, sort_keys=False))
    return p


@pytest.mark.slow
def test_seed_noise_is_inconclusive_and_a_bad_learning_rate_is_worse(seeded_study, tracking_uri):
    _, table = run_study(seeded_study, ["--system_metrics=false", "--log_checkpoint=false"], tracking_uri)
    s = table.summary.set_index("variant")
    assert list(s["n"]) == [5, 5, 5] and set(table.runs["seed"]) == {"0", "1", "2", "3", "4"}
    assert s.loc["reseeded", "verdict"] == "inconclusive"  # no margin: never "equivalent"
    assert s.loc["lr-100x-small", "verdict"] == "worse"
    assert s.loc["lr-100x-small", "Δ vs base"] > s.loc["lr-100x-small", "Δ vs base ±"] > 0
    # the paired difference is the mean of the per-seed differences, its interval scipy's paired t
    runs = table.runs.pivot(index="seed", columns="variant", values="val/loss")
    d = runs["lr-100x-small"] - runs["base"]
    lo, hi = stats.ttest_rel(runs["lr-100x-small"], runs["base"]).confidence_interval(0.95)
    assert s.loc["lr-100x-small", "Δ vs base"] == pytest.approx(d.mean())
    assert s.loc["lr-100x-small", "Δ vs base ±"] == pytest.approx((hi - lo) / 2)
    assert table.warnings == []  # equal steps and samples
    shown = render(table, "table")
    assert "QUICK study" in shown and "inconclusive" in shown and "worse" in shown
    assert "no difference" not in shown and "Holm across the 2 comparison(s)" in shown

    # the same seeds reproduce the table (CPU): every metric within 1e-4
    _, again = run_study(seeded_study, ["--system_metrics=false", "--log_checkpoint=false"], tracking_uri)
    for col in ("val/loss", "val/loss ±", "test/loss", "Δ vs base", "Δ vs base ±"):
        np.testing.assert_allclose(again.summary[col], table.summary[col], atol=1e-4, equal_nan=True)


def test_report_test_replaces_validation_columns_and_budgets_that_differ_are_flagged(seeded_study, tracking_uri):
    raw = yaml.safe_load(seeded_study.read_text())
    raw.update(report="test", seeds=[0, 1], columns=["val/loss"])
    raw["variants"] = {"base": {}, "longer": {"trainer.max_steps": 16}}
    seeded_study.write_text(yaml.safe_dump(raw))
    _, table = run_study(seeded_study, ["--system_metrics=false", "--log_checkpoint=false"], tracking_uri)
    assert table.report_metric == "test/loss" and "val/loss" not in table.summary.columns
    assert "Δ vs base" in table.summary.columns
    assert any("budget/steps differs" in w for w in table.warnings)
    assert "budget/steps differs" in render(table, "table")


def test_mean_ci_and_paired_difference_by_hand():
    x = [1.0, 2.0, 3.5]
    mean, half, n = st.mean_ci(x)
    sd = np.std(x, ddof=1)
    assert (mean, n) == (pytest.approx(13 / 6), 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert st.mean_ci([2.0]) [1] != st.mean_ci([2.0])[1]  # NaN: one run has no interval
    assert st.mean_ci([2.0, 2.0]) == (2.0, 0.0, 2)
    d, half, n = st.paired_difference({0: 1.0, 1: 2.0, 2: 4.0, 9: 7.0}, {0: 0.5, 1: 1.0, 2: 3.0})
    diffs = np.array([0.5, 1.0, 1.0])
    assert (d, n) == (pytest.approx(diffs.mean()), 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3))


@pytest.mark.parametrize("diff, half, mode, want", [
    (-0.3, 0.1, "min", "better"), (0.3, 0.1, "min", "worse"), (0.3, 0.1, "max", "better"),
    (0.05, 0.1, "min", "inconclusive"), (0.0, 0.0, "min", "inconclusive"), (0.2, 0.0, "max", "better"),
    (0.2, float("nan"), "min", "inconclusive"), (0.2, 0.1, None, ""),
])
def test_verdict(diff, half, mode, want):
    assert st.verdict(diff, half, mode) == want


def test_equivalent_needs_a_margin_and_the_90_percent_interval_inside_it():
    assert st.verdict(0.01, 0.05, "min", margin=0.1, half90=0.04) == "equivalent"  # 0.01 + 0.04 < 0.1
    assert st.verdict(0.01, 0.05, "min", margin=0.05, half90=0.04) == "inconclusive"  # 0.05 is not inside
    assert st.verdict(0.01, 0.05, "min", margin=None, half90=0.04) == "inconclusive"
    assert st.verdict(0.2, 0.05, "min", margin=1.0, half90=0.04) == "worse"  # excludes zero: the direction first


def test_metric_directions():
    assert [st.mode_of(k) for k in ("val/loss", "test/acc", "perf/tokens_per_s", "mem/grads_bytes", "time/fit_s",
                                    "params/trainable", "test/fid")] == ["min", "max", "max", "min", "min", None, "min"]
    assert st.mode_of("val/loss", {"val/loss": "max"}) == "max"


def test_numbers_for_people():
    assert human(1.73926e6, "mem/grads_bytes") == "1.659 MiB"
    assert human(3 * 2**30, "mem/params_bytes") == "3 GiB"
    assert human(0.000499893, "perf/step_time_s") == "0.0004999 s"
    assert human(17312.5, "perf/tokens_per_s") == "1.731e+04"
    assert human(float("nan"), "val/loss") == ""


def test_people_table_drops_empty_columns():
    from pipelines.compare import StudyTable

    summary = pd.DataFrame({"variant": ["a"], "n": [1], "status": ["FINISHED"], "val/loss": [1.23456],
                            "val/loss ±": [float("nan")], "empty": [float("nan")], "empty ±": [float("nan")]})
    t = StudyTable(summary, summary, pd.DataFrame(), None, "val/loss")
    assert list(people_table(t).columns) == ["variant", "n", "status", "val/loss"]
    assert people_table(t)["val/loss"][0] == "1.235"
    t.summary["val/loss ±"] = [0.0]  # every seed agrees: no "± 0"
    assert people_table(t)["val/loss"][0] == "1.235"
    t.summary["val/loss ±"] = [0.01234]
    assert people_table(t)["val/loss"][0] == "1.235 ± 0.01234"


def test_study_declarations_are_checked(seeded_study):
    raw = yaml.safe_load(seeded_study.read_text())
    for bad, match in [({"seeds": [1, 1]}, "distinct integers"), ({"seeds": []}, "non-empty"),
                       ({"baseline": "nope"}, "baseline 'nope' is not a variant"),
                       ({"report": "train"}, "report must be 'val' or 'test'"),
                       ({"modes": {"val/loss": "up"}}, "'min' or 'max'")]:
        seeded_study.write_text(yaml.safe_dump({**raw, **bad}))
        with pytest.raises(ConfigError, match=match):
            load_study(seeded_study)


def test_tuned_study_is_one_parent_with_trials_and_seeded_runs_and_a_rerun_repeats_no_trial(seeded_study, tracking_uri):
    import json

    from mlflow import MlflowClient

    raw = yaml.safe_load(seeded_study.read_text())
    raw.update(seeds=[0, 1], variants={"base": {}, "wide": {"model.init_args.hidden": 16}},
               tune={"n_trials": 3, "pruner": "none", "params": {"model.init_args.lr": {"low": 1e-3, "high": 1e-1, "log": True}}})
    seeded_study.write_text(yaml.safe_dump(raw))
    parent, table = run_study(seeded_study, ["--system_metrics=false", "--log_checkpoint=false"], tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent).info.experiment_id
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    trials = [r for r in kids if r.data.tags["practicum.role"] == "trial"]
    seeded = [r for r in kids if r.data.tags["practicum.role"] == "variant"]
    assert sorted(r.data.tags["practicum.trial_of"] for r in trials) == ["base"] * 3 + ["wide"] * 3  # same budget
    assert len(seeded) == 4
    for v in ("base", "wide"):
        best = json.loads(Path(client.download_artifacts(parent, f"tune/{v}.json")).read_text())["best_params"]
        trial_values = {float(r.data.params["model.init_args.lr"]): r.data.metrics["val/loss"]
                        for r in trials if r.data.tags["practicum.trial_of"] == v}
        assert best["model.init_args.lr"] == pytest.approx(min(trial_values, key=trial_values.get))
        for r in seeded:  # the seeded runs use the variant's best config
            if r.data.tags["practicum.variant"] == v:
                assert float(r.data.params["model.init_args.lr"]) == pytest.approx(best["model.init_args.lr"])
        assert json.loads(dict(zip(table.summary["variant"], table.summary["tuned"]))[v]) == best  # shown in the table

    again, table2 = run_study(seeded_study, ["--system_metrics=false", "--log_checkpoint=false"], tracking_uri)
    kids2 = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{again}'")
    assert [r for r in kids2 if r.data.tags["practicum.role"] == "trial"] == []  # the storage already holds them
    assert list(table2.summary["tuned"]) == list(table.summary["tuned"])


def test_a_pair_far_inside_its_margin_comes_out_equivalent_with_seeds_added_in_rounds(seeded_study, tracking_uri, capsys):
    """The real pipeline, seeds in rounds: "reseeded" differs from "base" only by its random numbers
    (paired seed-noise sd ~1 nat on a loss of ~11, a true difference of zero), far inside a margin of
    3; the 100x-too-small learning rate is worse. Both claims are decided before the cap, and the
    parent run carries the verdict for the MLflow UI."""
    import json

    from mlflow import MlflowClient

    raw = yaml.safe_load(seeded_study.read_text())
    raw.update(seeds={"pilot": 3, "max": 9, "step": 3}, margins={"val/loss": 3.0},
               claims=[{"variant": "reseeded", "metric": "val/loss", "expect": "equivalent"},
                       {"variant": "lr-100x-small", "metric": "val/loss", "expect": "worse"}])
    seeded_study.write_text(yaml.safe_dump(raw))
    parent, table = run_study(seeded_study, ["--system_metrics=false", "--log_checkpoint=false"], tracking_uri)
    assert {str(c.claim): c.outcome for c in table.claims} == {
        "reseeded val/loss equivalent": "holds", "lr-100x-small val/loss worse": "holds"}
    s = table.summary.set_index("variant")
    assert s.loc["reseeded", "verdict"] == "equivalent" and s.loc["lr-100x-small", "verdict"] == "worse"
    run = MlflowClient(tracking_uri).get_run(parent)
    looks = json.loads(run.data.tags["practicum.looks"])
    assert looks[0] == 3 and looks == sorted(looks) and looks[-1] <= 9
    assert set(s["n"]) <= set(looks) and s["n"].max() == looks[-1]  # no seed beyond the last look
    # the equivalence by hand: the mean paired difference, its interval inside ±3
    runs = table.runs.pivot(index="seed", columns="variant", values="val/loss").dropna(subset=["reseeded"])
    eq = table.claims[0]
    assert eq.estimate == pytest.approx((runs["reseeded"] - runs["base"]).mean())
    assert -3.0 < eq.low < eq.estimate < eq.high < 3.0 and eq.n == len(runs)
    # what the MLflow UI shows on the parent: means, half-widths and each claim's verdict
    assert run.data.tags["claim/reseeded/val/loss/equivalent"] == "holds"
    assert run.data.tags["verdict/reseeded"] == "equivalent"
    assert run.data.metrics["val/loss/reseeded/mean"] == pytest.approx(s.loc["reseeded", "val/loss"])
    assert run.data.metrics["val/loss/base/ci_half"] == pytest.approx(s.loc["base", "val/loss ±"])
    shown = render(table, "table")
    assert "group-sequential" in shown and "reseeded val/loss equivalent (±3): holds" in shown

    # --plan reads the finished runs and runs nothing more
    from pipelines.cli import main

    before = len(MlflowClient(tracking_uri).search_runs([run.info.experiment_id]))
    assert main(["study", str(seeded_study), "--plan", "--tracking_uri", tracking_uri]) == 0
    assert "claim reseeded val/loss equivalent: holds at n=" in capsys.readouterr().out
    assert len(MlflowClient(tracking_uri).search_runs([run.info.experiment_id])) == before
