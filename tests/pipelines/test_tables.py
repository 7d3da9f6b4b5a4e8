"""A study's table as a reader gets it: at 100 columns in a log file (the terminal's width in a
terminal), the report metric and its verdict first, every other column behind --wide; a requested
column no run logged is an error; no verdict on a metric the study declares not comparable."""

import io
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines import tables
from pipelines.cli import main
from pipelines.compare import find_parent, study_table
from pipelines.tracking import ConfigError
from tests.helpers import logged_study

# a LoRA-vs-full study as lora-quick logs it: two variants, two seeds, many metrics
LEDGER = {"params/trainable": 434816, "params/trainable_pct": 100.0, "mem/grads_bytes": 1.74e6,
          "mem/optimizer_bytes": 3.48e6, "mem/activations_bytes": 1.9e7, "perf/tokens_per_s": 12450.0,
          "disk/full_checkpoint_bytes": 1.75e6, "budget/steps": 20, "budget/samples": 320, "time/fit_s": 2.7}
LORA = {**LEDGER, "params/trainable": 32768, "params/trainable_pct": 7.0, "mem/grads_bytes": 131072,
        "mem/optimizer_bytes": 262272, "disk/adapter_bytes": 133120}
CLAIMS = [{"variant": "lora-r8", "metric": "mem/optimizer_bytes", "expect": "<= 0.1x"},
          {"variant": "lora-r8", "metric": "test/loss", "expect": "equivalent"}]


def _lora_study(uri, columns=("params/trainable", "params/trainable_pct", "mem/grads_bytes", "mem/optimizer_bytes",
                              "mem/activations_bytes", "perf/tokens_per_s", "val/loss", "disk/adapter_bytes",
                              "disk/full_checkpoint_bytes"), **declared):
    runs = {"full": [{**LEDGER, "test/loss": 2.94, "time/fit_s": 2.6}, {**LEDGER, "test/loss": 2.98}],
            "lora-r8": [{**LORA, "test/loss": 3.35}, {**LORA, "test/loss": 3.28, "perf/tokens_per_s": 11000.0}]}
    logged_study(uri, "lora-like", runs, columns=list(columns), report="test", baseline="full",
                 margins={"test/loss": 0.05}, claims=CLAIMS, **declared)
    client = MlflowClient(uri)
    return study_table(client, find_parent(client, "lora-like"))


def test_the_table_fits_100_columns_verdict_first_and_wide_shows_every_column(tracking_uri):
    t = _lora_study(tracking_uri)
    shown = tables.render(t, "table", width=100)
    assert max(map(len, shown.splitlines())) <= 100
    header = next(line for line in shown.splitlines() if line.startswith("variant"))
    cols = header.split()
    assert cols[:4] == ["variant", "n", "test/loss", "Δ"] and "verdict" in cols
    assert "mem/optimizer_bytes" in cols  # a claim's metric: the study's key cost
    assert "status" not in cols  # every run finished
    hidden = tables.narrow(t, 100)[1]
    assert "params/trainable_pct" in hidden and f"{len(hidden)} more column(s)" in shown
    assert "practicum compare lora-like --wide" in shown

    # --wide: every column; two variants and many metrics read down the page (transposed), in 100 columns
    wide = tables.render(t, "table", width=100, wide=True)
    assert max(map(len, wide.splitlines())) <= 100
    rows = [line.split()[0] for line in wide.splitlines()]
    assert {"params/trainable_pct", "disk/adapter_bytes", "verdict", "test/loss", "budget/samples"} <= set(rows)
    assert next(line for line in wide.splitlines() if line.startswith("disk/adapter_bytes")).split()[1:] \
        == ["130", "KiB"]  # only LoRA has an adapter: one cell, in its column (the last)
    # where the transposed table does not fit either: the row table, as wide as it needs
    assert max(map(len, tables.table_body(t, 40, wide=True).splitlines())) > 100

    # csv, json and markdown keep every column of the summary
    assert list(pd.read_csv(io.StringIO(tables.render(t, "csv"))).columns) == list(t.summary.columns)
    md_header = tables.render(t, "markdown").splitlines()[0]
    assert all(f" {c} |" in md_header for c in t.summary.columns)
    assert md_header.index("verdict") < md_header.index("params/trainable")  # the verdict on screen in the UI


def test_width_is_the_terminal_s_and_100_without_one(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a file or a pipe: 100 whatever COLUMNS says
    assert tables.terminal_width() == 100

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    assert tables.terminal_width() == 160


def test_a_requested_column_no_run_logged_is_an_error_naming_it(tracking_uri, capsys):
    with pytest.raises(ConfigError, match=r"test/loss_before \(asked as val/loss_before; report: test"):
        _lora_study(tracking_uri, columns=["val/loss_before", "mem/optimizer_bytes"])
    assert main(["compare", "lora-like", "--tracking_uri", tracking_uri]) == 2
    assert "test/loss_before" in capsys.readouterr().err


def test_an_interrupted_study_is_summarised_though_a_variant_that_never_ran_would_log_a_column(tracking_uri):
    """optimizers stopped by SIGTERM before its LeNet rows: val/acc is theirs, so its absence is no typo.
    The parent lists the planned variants; one of them has no finished run, so the table is made (the
    column empty) and the error is kept for a study whose every variant finished."""
    logged_study(tracking_uri, "stopped", {"gpt-adamw": [{"val/loss": 2.1}, {"val/loss": 2.2}]},
                 columns=["val/loss", "val/acc"])
    client = MlflowClient(tracking_uri)
    parent = find_parent(client, "stopped")
    client.set_tag(parent.info.run_id, "practicum.variants", '["gpt-adamw", "lenet-adamw"]')
    t = study_table(client, find_parent(client, "stopped"))
    assert t.summary["val/acc"].isna().all() and list(t.summary["variant"]) == ["gpt-adamw"]
    client.set_tag(parent.info.run_id, "practicum.variants", '["gpt-adamw"]')  # all ran: the column is a typo
    with pytest.raises(ConfigError, match=r"column\(s\) val/acc match no metric"):
        study_table(client, find_parent(client, "stopped"))


def test_the_verdict_line_says_so_when_no_seed_finished_on_both_sides(tracking_uri):
    """Both runs of `wide` failed (here: logged no val/loss): the line said "wide  (Δ  ± , n=0)"."""
    logged_study(tracking_uri, "nopairs", {"narrow": [{"val/loss": 1.0}, {"val/loss": 1.1}],
                                           "wide": [{"train/loss": 1.0}, {"train/loss": 1.2}]}, baseline="narrow")
    client = MlflowClient(tracking_uri)
    line = study_table(client, find_parent(client, "nopairs")).verdict_line()
    assert line == "val/loss vs narrow: wide: no seed finished on both sides", line


def test_no_verdict_on_a_metric_the_study_declares_not_comparable(tracking_uri):
    # ddpm-quick: the loss under each variant's own noise schedule; cosine's is higher by construction
    runs = {"linear": [{"train/loss": 0.030, "test/loss": 0.031}, {"train/loss": 0.031, "test/loss": 0.032}],
            "cosine": [{"train/loss": 0.060, "test/loss": 0.061}, {"train/loss": 0.062, "test/loss": 0.064}]}
    logged_study(tracking_uri, "ddpm-like", runs, columns=["train/loss", "val/loss"], report="test",
                 baseline="linear", comparable=[])
    client = MlflowClient(tracking_uri)
    t = study_table(client, find_parent(client, "ddpm-like"))
    assert t.differences.empty and "verdict" not in t.summary  # without the declaration: "worse" on both
    assert "no verdict" in t.verdict_line() and "worse" not in tables.render(t, "table", width=100)
    assert "comparable" in tables.render(t, "table", width=100)
    # declared comparable, the same runs earn their verdict
    client.set_tag(find_parent(client, "ddpm-like").info.run_id, "practicum.comparable", '["test/loss"]')
    t = study_table(client, find_parent(client, "ddpm-like"))
    assert list(t.differences["metric"]) == ["test/loss"] and t.summary.set_index("variant").loc["cosine", "verdict"] == "worse"


def test_a_claim_on_a_metric_not_declared_comparable_is_refused(tmp_path):
    from pipelines.study import load_study
    from tests.helpers import ROOT

    raw = (ROOT / "configs/studies/ddpm-quick.yaml").read_text().replace("../diffusion/", f"{ROOT}/configs/diffusion/")
    raw += "claims:\n  - {variant: cosine, metric: train/loss, expect: worse}\n"
    (tmp_path / "s.yaml").write_text(raw)
    with pytest.raises(ConfigError, match=r"train/loss is not among the metrics the study declares comparable"):
        load_study(tmp_path / "s.yaml")


def test_study_prints_the_narrow_table_and_every_column_with_wide(tracking_uri, capsys, monkeypatch, tmp_path):
    """`practicum study FILE --wide` ends with the same table as `compare --wide`; without it, the narrow one."""
    t = _lora_study(tracking_uri)
    parent = find_parent(MlflowClient(tracking_uri), "lora-like").info.run_id
    monkeypatch.setattr("pipelines.study.run_study", lambda *a, **k: (parent, t))
    study = tmp_path / "s.yaml"
    study.write_text("name: lora-like\n")
    for flags, expected in (([], tables.render(t, "table")), (["--wide"], tables.render(t, "table", wide=True))):
        assert main(["study", str(study), "--tracking_uri", tracking_uri, *flags]) == 0
        out = capsys.readouterr().out
        assert expected in out
    assert "disk/adapter_bytes" in out and "more column(s)" not in out


def test_a_variant_with_its_own_baseline_is_compared_with_it_and_that_baseline_gets_no_verdict(tracking_uri):
    """Two bases in one study (peft-methods: the mini-GPT and the tiny Llama): the Llama rows against the
    Llama's LoRA, not against the mini-GPT's, whose losses are on another scale."""
    low, high = [{"test/loss": x} for x in (2.70, 2.80, 2.75)], [{"test/loss": x} for x in (2.16, 2.14, 2.15)]
    runs = {"lora": low, "full": [{"test/loss": r["test/loss"] - e} for r, e in zip(low, (0.2, 0.21, 0.19))],
            "llama-lora": high, "llama-full": [{"test/loss": r["test/loss"] + e} for r, e in zip(high, (0.004, -0.003, 0.001))]}
    logged_study(tracking_uri, "two-bases", runs, report="test", baseline="lora", primary_metric="val/loss",
                 margins={"test/loss": 0.05}, against={"llama-full": "llama-lora"})
    client = MlflowClient(tracking_uri)
    t = study_table(client, find_parent(client, "two-bases"))
    d = t.differences[t.differences["metric"] == "test/loss"].set_index("variant")
    assert set(d.index) == {"full", "llama-full"}  # neither baseline is compared with the other
    assert d.loc["llama-full", "baseline"] == "llama-lora" and d.loc["llama-full", "verdict"] == "equivalent"
    assert d.loc["full", "baseline"] == "lora" and d.loc["full", "verdict"] == "better"
    assert "llama-full vs llama-lora equivalent" in t.verdict_line() and "llama-lora" not in t.verdict_line().split(
        "llama-full")[0]
    shown = tables.render(t, "table", width=100)
    row = next(line for line in shown.splitlines() if line.startswith("llama-full"))
    assert "llama-lora" in row.split() and "equivalent" in row.split()


def test_against_must_name_another_variant(tmp_path):
    from pipelines.study import load_study
    from tests.helpers import ROOT

    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nbase: {ROOT / 'configs/gpt/shakespeare_char_cpu.yaml'}\n"
                     "variants: {a: {}, b: {against: c}}\n")
    with pytest.raises(ConfigError, match=r"variant 'b': against 'c' must name another variant; variants: \['a', 'b'\]"):
        load_study(study)


def test_a_claim_on_a_variant_with_its_own_baseline_is_judged_against_it(tmp_path):
    """Unless the claim names another: the table compares llama-full with llama-lora, and so does its claim."""
    from pipelines.study import load_study
    from tests.helpers import ROOT

    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nbase: {ROOT / 'configs/gpt/shakespeare_char_cpu.yaml'}\nbaseline: gpt\n"
                     "variants: {gpt: {}, llama-lora: {}, llama-full: {against: llama-lora}}\n"
                     "claims: [{variant: llama-full, metric: val/loss, expect: better},\n"
                     "         {variant: llama-full, metric: val/loss, expect: worse, against: gpt},\n"
                     "         {variant: llama-lora, metric: val/loss, expect: worse}]\n")
    assert [c.against for c in load_study(study).claims] == ["llama-lora", "gpt", None]


def test_a_stage_bar_is_judged_on_the_stage_run_the_study_used_and_printed_under_the_table(tracking_uri, tmp_path):
    import json

    from pipelines import rounds
    from pipelines.study import load_study
    from tests.helpers import ROOT

    client = MlflowClient(tracking_uri)
    bars = [{"stage": "reward", "metric": "test/accuracy", "at_least": 0.6, "count": "test/pairs"}]
    logged_study(tracking_uri, "rm-like", {"sft": [{"test/true_reward": 0.0}] * 2, "ppo": [{"test/true_reward": 0.1}] * 2},
                 report="test", baseline="sft", bars=bars)
    parent = find_parent(client, "rm-like")
    stage = client.create_run(parent.info.experiment_id, run_name="stage-reward").info.run_id
    client.log_metric(stage, "test/accuracy", 130 / 171)
    client.log_metric(stage, "test/pairs", 171)
    client.set_tag(parent.info.run_id, "practicum.stages", json.dumps({"reward": stage}))
    t = study_table(client, client.get_run(parent.info.run_id))
    assert [(b.outcome, b.n) for b in t.bars] == [("holds", 171)]
    text = tables.render(t)
    assert "bars (a stage's proportion against its bar" in text and "stage reward test/accuracy >= 0.6: holds" in text
    assert rounds.record(t)[1]["bar/reward/test/accuracy/ge0.6"] == "holds"  # a tag on the parent: the MLflow UI's
    # a study file declares them, checked against its stages
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nbase: {ROOT / 'configs/gpt/shakespeare_char_cpu.yaml'}\nvariants: {{a: {{}}}}\n"
                     f"stages: {{reward: {{config: {ROOT / 'configs/gpt/shakespeare_char_cpu.yaml'}}}}}\n"
                     f"bars: {json.dumps(bars)}\n")
    assert [b.stage for b in load_study(study).bars] == ["reward"]
    assert json.loads(rounds.parent_tags(load_study(study))["practicum.bars"]) == bars
    study.write_text(study.read_text().replace("stage\": \"reward", "stage\": \"rm"))
    with pytest.raises(ConfigError, match="stage 'rm' is not one of the study's stages"):
        load_study(study)
