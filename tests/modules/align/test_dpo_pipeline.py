"""The dpo study's shape through the real pipeline into a temporary MLflow store: the supervised
model trained as a stage run, the pairs sampled from it as a second stage (a JSONL artifact), then
the supervised model, best-of-n and DPO as variants, the table on the test split and the
reward-KL scatter plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.study import run_study
from tests.helpers import claims_about

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_tiny_dpo_study(tmp_path, tracking_uri, monkeypatch):
    real = yaml.safe_load((ROOT / "configs" / "studies" / "dpo.yaml").read_text())
    study = {
        **real,
        "base": str(ROOT / "configs" / "align" / "dpo_minigpt.yaml"),
        "seeds": [0],
        "stages": {"sft": {"config": str(ROOT / "configs" / "align" / "minigpt_sft.yaml"), "overrides": {
            "trainer.max_steps": 15, "model.init_args.n_layer": 1, "model.init_args.n_embd": 32,
            "model.init_args.n_head": 2, "model.init_args.lr": 1.0e-2, "data.init_args.block_size": 32}},
            "pairs": {"config": str(ROOT / "configs" / "align" / "pairs_minigpt.yaml"), "overrides": {
                "model.init_args.backbone": "runs:/{stages.sft}", "data.init_args.n_prompts": 32,
                "data.init_args.n_eval_prompts": 4, "data.init_args.prompt_chars": 8,
                "data.init_args.max_new_tokens": 16, "data.init_args.reward": "tests.helpers.count_e"}}},
        "overrides": {**real["overrides"], "trainer.max_steps": 4, "trainer.val_check_interval": 4,
                      "data.init_args.n_eval_prompts": 4, "data.init_args.max_new_tokens": 16,
                      "data.init_args.batch_size": 8, "model.init_args.lr": 3.0e-3,
                      # a dense reward: a 15-step model writes few words VADER knows
                      "data.init_args.reward": "tests.helpers.count_e"},
        "variants": {"sft": real["variants"]["sft"], "best-of-2": {"trainer.max_steps": 0, "model.init_args.best_of": 2},
                     "dpo-beta0.1": real["variants"]["dpo-beta0.1"]},
    }
    study["claims"] = claims_about(real.get("claims", []), study["variants"])
    path = tmp_path / "dpo-tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))  # stage order matters
    parent, table = run_study(path, tracking_uri=tracking_uri, system_metrics=False)
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent).info.status == "FINISHED"
    runs = table.runs.set_index("variant")
    assert list(runs["status"]) == ["FINISHED"] * 3
    assert runs.loc["sft", "test/loss"] == pytest.approx(math.log(2), abs=1e-6)  # no steps: pi = pi_ref
    assert runs.loc["sft", "test/kl"] == 0 and runs.loc["sft", "test/rewards/margins"] == 0
    assert runs.loc["best-of-2", "test/kl"] == pytest.approx(math.log(2) - 0.5)
    assert runs.loc["dpo-beta0.1", "test/kl"] != 0 and runs.loc["dpo-beta0.1", "test/loss"] != pytest.approx(math.log(2))
    assert table.report_metric == "test/true_reward"
    assert {"test/rewards/accuracies", "test/rewards/margins", "test/kl"} <= set(table.summary.columns)
    stages = json.loads(client.get_run(parent).data.tags["practicum.stages"])
    assert [a.path for a in client.list_artifacts(stages["pairs"], "pairs")] == ["pairs/pairs.jsonl"]
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert "plots/test_true_reward_vs_test_kl.png" in plots
