"""A two-variant study on the toy project, then `practicum compare` rebuilds the same table from MLflow."""

import io
import json

import pandas as pd
import pytest
import yaml
from matplotlib.container import BarContainer
from mlflow import MlflowClient

from pipelines.chart_view import decode
from pipelines.cli import main
from pipelines.tables import compare
from pipelines.study import load_study, run_study, study_plots
from pipelines.tracking import ConfigError
from tests.pipelines.toy import TOY


@pytest.fixture
def study_file(tmp_path):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(TOY))
    study = {
        "name": "toy-study",
        "base": "toy.yaml",
        "primary_metric": "train/loss",
        "columns": ["train/loss", "val/loss", "params/total", "mem/params_bytes"],
        "overrides": {"trainer.max_steps": 6},
        "variants": {
            "narrow": {"model.init_args.hidden": 4},
            "wide": {"model.init_args.hidden": 32},
            "broken": {"model.init_args.fail_at_step": 3},
        },
    }
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(study, sort_keys=False))
    return p


def test_study_runs_children_and_compare_matches(study_file, tracking_uri, capsys):
    parent_id, table = run_study(study_file, ["--system_metrics=false"], tracking_uri)
    df = table.summary
    assert list(df["variant"]) == ["narrow", "wide", "broken"]
    assert list(df["status"]) == ["FINISHED", "FINISHED", "FAILED"]  # the failure did not stop the study
    # the primary metric first, each metric with its interval, then the budget each variant used
    assert [c for c in df.columns if not c.endswith(" ±")][:10] == [
        "variant", "n", "status", "train/loss", "val/loss", "params/total", "mem/params_bytes", "budget/steps",
        "budget/samples", "params/trainable"]
    assert list(df["budget/steps"][:2]) == [6, 6] and table.warnings == []
    narrow, wide = df.set_index("variant").loc[["narrow", "wide"], "params/total"]
    assert (narrow, wide) == (4 * 4 + 4 + 4 + 1, 4 * 32 + 32 + 32 + 1)

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["practicum.study"] == "toy-study"
    kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.data.tags["practicum.variant"] for r in kids) == ["broken", "narrow", "wide"]
    assert all(r.data.params["trainer.max_steps"] == "6" for r in kids)
    view = client.get_experiment(parent.info.experiment_id).tags["mlflow.sharedViewState.practicum-charts"]
    assert [s["name"] for s in decode(view)["compareRunSections"]][:2] == ["train", "val"]  # the UI's charts
    arts = {a.path for a in client.list_artifacts(parent_id)} | {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert {"comparison.csv", "comparison.md", "plots/train_loss.png", "plots/memory_throughput.png"} <= arts
    check_plotted_data(client, parent_id, {r.data.tags["practicum.variant"]: r for r in kids})

    # compare reads MLflow only and gives the same table
    again = pd.read_csv(io.StringIO(compare("toy-study", tracking_uri, "csv")))
    pd.testing.assert_frame_equal(again, pd.read_csv(io.StringIO(df.to_csv(index=False))))
    rows = json.loads(compare("toy-study", tracking_uri, "json"))
    assert [r["variant"] for r in rows] == ["narrow", "wide", "broken"]
    assert main(["compare", "toy-study", "--format", "markdown", "--tracking_uri", tracking_uri]) == 0
    assert "| narrow" in capsys.readouterr().out


def check_plotted_data(client, parent_id: str, runs: dict) -> None:
    """The figures draw what the runs logged: each variant's curve is its train/loss history, each ledger
    bar its mem/params_bytes, each throughput bar its samples per second (one seed: the mean is the run)."""
    figs = study_plots(client, parent_id, "train/loss")
    curves = {line.get_label().split(" (")[0]: line for line in figs["train_loss.png"].axes[0].get_lines()}
    assert set(curves) == set(runs)
    for name, run in runs.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert list(curves[name].get_xdata()) == [s for s, _ in history], name
        assert list(curves[name].get_ydata()) == pytest.approx([v for _, v in history]), name
    ledger, _, throughput = figs["memory_throughput.png"].axes
    names = [t.get_text() for t in throughput.get_xticklabels()]
    bars = [[c for c in ax.containers if isinstance(c, BarContainer)] for ax in (ledger, throughput)]
    params_bars = bars[0][0]  # MEMORY_KEYS[0]: mem/params_bytes, one bar per variant in that order
    # the failed variant never reached the ledger: no bar (NaN on the log axis)
    logged = [runs[n].data.metrics.get("mem/params_bytes", float("nan")) for n in names]
    assert [b.get_height() for b in params_bars] == pytest.approx(logged, nan_ok=True)
    speed = [b.get_height() for b in bars[1][0]]
    assert speed == pytest.approx([runs[n].data.metrics.get("perf/samples_per_s", 0.0) for n in names])


def test_study_file_errors_name_the_problem(tmp_path, study_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "base": "toy.yaml", "variantz": {}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['variantz'\]; known keys: name, base, variants, "):
        load_study(bad)
    # the schema is the Study dataclass, read by jsonargparse: types and nested stage keys are checked
    for extra, match in [({"seeds": [1, "q"]}, "key 'seeds': expected int or None, got q"),
                         ({"equal_budget": "maybe"}, "key 'equal_budget': expected bool, got maybe"),
                         ({"stages": {"s": {"confg": "toy.yaml"}}},
                          "key 'stages': unknown key 'confg'; known keys: config, overrides")]:
        bad.write_text(yaml.safe_dump({"name": "x", "base": "toy.yaml", "variants": {"a": {}}, **extra}))
        with pytest.raises(ConfigError, match=match):
            load_study(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "base": "missing.yaml", "variants": {"a": {}}}))
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_study(bad)


def test_compare_unknown_study_names_known_ones(study_file, tracking_uri, capsys):
    run_study(study_file, ["--system_metrics=false"], tracking_uri, only=["narrow"])
    assert main(["compare", "no-such-study", "--tracking_uri", tracking_uri]) == 2
    assert "Known studies: toy-study" in capsys.readouterr().err


@pytest.mark.parametrize("cuda", [False, True])
def test_variant_requirements_skip_or_run(tmp_path, study_file, tracking_uri, monkeypatch, capsys, cuda):
    """`requires: cuda` keeps a variant out where there is no GPU and in where there is one.

    The study's GPU probe is faked both ways; the variant itself runs on the CPU, so both paths
    run here."""
    monkeypatch.setattr("pipelines.study._cuda_available", lambda: cuda)
    raw = yaml.safe_load(study_file.read_text())
    raw["variants"] = {"narrow": {"model.init_args.hidden": 4},
                       "gpu-only": {"requires": "cuda", "model.init_args.hidden": 8}}
    study_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    parent_id, table = run_study(study_file, ["--system_metrics=false"], tracking_uri)
    df = table.summary
    tags = MlflowClient(tracking_uri).get_run(parent_id).data.tags
    if cuda:
        assert list(df["variant"]) == ["narrow", "gpu-only"] and list(df["status"]) == ["FINISHED"] * 2
        assert "practicum.skipped" not in tags
    else:
        assert list(df["variant"]) == ["narrow"]
        assert json.loads(tags["practicum.skipped"]) == {"gpu-only": "needs a CUDA GPU, none here"}
        assert "gpu-only: skipped (needs a CUDA GPU, none here)" in capsys.readouterr().out


def test_unknown_requirement_is_named(tmp_path, study_file):
    raw = yaml.safe_load(study_file.read_text())
    raw["variants"]["wide"]["requires"] = ["tpu"]
    study_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"variant 'wide': unknown requirement\(s\) \['tpu'\]; known: \['bitsandbytes', 'cuda'\]"):
        load_study(study_file)
