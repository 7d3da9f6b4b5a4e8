"""The rlhf study's shape through the real pipeline into a temporary MLflow store: the sft, pairs and
reward stages, then the supervised model, best-of-n by the reward model, PPO and RLOO against it;
the reward model's artifacts, the over-optimisation plot and the gold-reward-KL frontier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.study import run_study
from tests.helpers import claims_about

ROOT = Path(__file__).resolve().parents[3]
ALIGN = ROOT / "configs" / "align"
TINY_DATA = {"data.init_args.n_eval_prompts": 4, "data.init_args.max_new_tokens": 16,
             "data.init_args.reward": "tests.helpers.count_e"}


@pytest.mark.slow
def test_tiny_rlhf_study(tmp_path, tracking_uri):
    real = yaml.safe_load((ROOT / "configs" / "studies" / "rlhf.yaml").read_text())
    prompts = {**TINY_DATA, "data.init_args.n_prompts": 32, "data.init_args.prompt_chars": 8}
    study = {
        **real,
        "base": str(ALIGN / "ppo_minigpt.yaml"),
        "seeds": [0],
        "stages": {
            "sft": {"config": str(ALIGN / "minigpt_sft.yaml"), "overrides": {
                "trainer.max_steps": 15, "model.init_args.n_layer": 1, "model.init_args.n_embd": 32,
                "model.init_args.n_head": 2, "model.init_args.lr": 1.0e-2, "data.init_args.block_size": 32}},
            "pairs": {"config": str(ALIGN / "pairs_minigpt.yaml"),
                      "overrides": {"model.init_args.backbone": "runs:/{stages.sft}", **prompts}},
            "reward": {"config": str(ALIGN / "reward_minigpt.yaml"), "overrides": {
                "model.init_args.backbone": "runs:/{stages.sft}", **TINY_DATA,
                "data.init_args.source": "runs:/{stages.pairs}/pairs/pairs.jsonl", "data.init_args.batch_size": 8,
                "trainer.max_steps": 8, "trainer.val_check_interval": 4}}},
        "overrides": {**real["overrides"], **prompts, "data.init_args.batch_size": 8, "model.init_args.eval_samples": 1},
        "variants": {
            "sft": real["variants"]["sft"],
            "best-of-2-rm": {**real["variants"]["best-of-4-rm"], "model.init_args.best_of": 2},
            "rloo": {**real["variants"]["rloo-kl0.1"], "trainer.max_steps": 2, "trainer.val_check_interval": 2},
            "ppo": {**real["variants"]["ppo-kl0.1"], "trainer.max_steps": 8, "trainer.val_check_interval": 1,
                    "trainer.log_every_n_steps": 1},  # manual optimisation: counted in batches of prompts
        },
    }
    study["claims"] = claims_about(real.get("claims", []), study["variants"])
    for v in study["variants"].values():  # variant bases are relative to the study file: make them absolute
        if "base" in v:
            v["base"] = str(ALIGN / Path(v["base"]).name)
    path = tmp_path / "rlhf-tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))  # stage order matters
    parent, table = run_study(path, tracking_uri=tracking_uri, system_metrics=False)
    client = MlflowClient(tracking_uri)
    runs = table.runs.set_index("variant")
    assert list(runs["status"]) == ["FINISHED"] * 4
    assert runs.loc["sft", "test/kl"] == 0 and runs.loc["ppo", "test/kl"] != 0
    assert {"test/true_reward", "test/proxy_reward", "test/kl"} <= set(table.summary.columns)
    stages = json.loads(client.get_run(parent).data.tags["practicum.stages"])
    reward = client.get_run(stages["reward"]).data.metrics
    assert {"val/accuracy", "val/margin", "test/accuracy", "test/calibration_ece"} <= set(reward)
    assert {a.path for a in client.list_artifacts(stages["reward"], "reward")} == {
        "reward/model.ckpt", "reward/calibration_test.png"}
    ppo = client.search_runs([client.get_run(parent).info.experiment_id],
                             "tags.mlflow.runName = 'ppo seed=0'")[0].info.run_id
    assert [a.path for a in client.list_artifacts(ppo, "plots")] == ["plots/overoptimisation.png"]
    history = client.get_metric_history(ppo, "train/proxy_reward")
    assert len(history) == 2 and len(client.get_metric_history(ppo, "val/kl")) == 2  # over training
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert "plots/test_true_reward_vs_test_kl.png" in plots


def test_a_stage_may_name_only_an_earlier_stage(tmp_path):
    from pipelines.study import load_study
    from pipelines.tracking import ConfigError

    real = yaml.safe_load((ROOT / "configs" / "studies" / "rlhf.yaml").read_text())
    stages = {k: {**v, "config": str(ALIGN / Path(v["config"]).name)} for k, v in real["stages"].items()}
    good = {**real, "base": str(ALIGN / "ppo_minigpt.yaml"), "stages": stages}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
    load_study(tmp_path / "good.yaml")
    swapped = {**good, "stages": {"pairs": stages["pairs"], "sft": stages["sft"]}}  # pairs names sft, run after it
    swapped.pop("bars", None)  # they name the reward stage, which this study lacks
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(swapped, sort_keys=False))
    with pytest.raises(ConfigError, match="stage 'pairs'.*only the stages before it"):
        load_study(tmp_path / "bad.yaml")
