"""The fine-tuning project through the real pipeline into a temporary MLflow store: one run on a
local base, and the study whose base is pretrained as a stage run of its own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import PracticumCLI
from pipelines.run import run_experiment
from pipelines.study import load_study, run_study

ROOT = Path(__file__).resolve().parents[3]


def test_study_variants_parse():
    study = load_study(ROOT / "configs" / "studies" / "lora-vs-full.yaml")
    assert set(study.variants) == {"full", "lora-r8", "lora-r64", "qlora-r64"}
    assert study.variants["qlora-r64"]["requires"] == ["cuda", "bitsandbytes"]  # skipped, with a note, elsewhere
    assert study.stage_config("base")[0] == ROOT / "configs" / "finetune" / "minigpt_base.yaml"
    methods = {}
    base_trainer = PracticumCLI(["--config", str(study.base)]).config.trainer
    for name in study.variants:
        config, args = study.variant_config(name, {"base": "f" * 32})
        cfg = PracticumCLI(["--config", str(config), *args]).config
        methods[name] = (cfg.model.init_args.method, cfg.model.init_args.r)
        assert cfg.model.init_args.backbone == "runs:/" + "f" * 32  # the stage's run, fetched by the pipeline
        assert cfg.trainer == base_trainer  # equal steps
    assert methods == {"full": ("full", 8), "lora-r8": ("lora", 8), "lora-r64": ("lora", 64), "qlora-r64": ("qlora", 64)}


def test_lora_run_through_the_pipeline(tracking_uri, tiny_minigpt_ckpt):
    res = run_experiment(
        ROOT / "configs" / "finetune" / "minigpt_lora.yaml",
        [
            f"--model.init_args.backbone={tiny_minigpt_ckpt}",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--data.init_args.max_length=32", "--data.init_args.batch_size=4", "--data.init_args.max_records=6",
        ],
        tracking_uri=tracking_uri,
        system_metrics=False,
    )
    assert res.status == "FINISHED", res.error
    run = MlflowClient(tracking_uri).get_run(res.run_id)
    m = run.data.metrics
    for key in ("train/loss", "val/loss", "val/ppl", "val/loss_before", "val/ppl_before", "params/trainable",
                "params/trainable_pct", "mem/grads_bytes", "mem/optimizer_bytes", "disk/adapter_bytes",
                "disk/full_checkpoint_bytes", "perf/tokens_per_s"):
        assert key in m, key
    assert run.data.tags["practicum.project"] == "finetune"
    assert len(run.data.params["data.fingerprint"]) == 64
    assert m["mem/grads_bytes"] == 4 * m["params/trainable"]  # fp32 gradients of the adapters only
    assert m["disk/adapter_bytes"] < m["disk/full_checkpoint_bytes"]
    client = MlflowClient(tracking_uri)
    artifacts = {a.path for d in ("adapter", "merged") for a in client.list_artifacts(res.run_id, d)}
    assert {"adapter/adapter_model.safetensors", "adapter/practicum.json", "merged/model.ckpt"} <= artifacts
    # the run's own checkpoint (adapters only) rebuilds the model for `practicum generate`
    from pipelines.generate import load_generator

    gen = load_generator(res.checkpoint)
    assert type(gen).__name__ == "FinetuneModule" and gen.method == "lora"
    assert gen.generate_text("x = ", 5, seed=0).startswith("x = ")


def test_test_split_is_scored_through_the_pipeline(tracking_uri, tiny_minigpt_ckpt):
    args = [f"--model.init_args.backbone={tiny_minigpt_ckpt}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1", "--data.init_args.max_length=32", "--data.init_args.batch_size=4",
            "--data.init_args.max_records=3", "--data.init_args.test_fraction=0.05"]
    res = run_experiment(ROOT / "configs" / "finetune" / "minigpt_lora.yaml", args, tracking_uri=tracking_uri,
                         system_metrics=False)
    assert res.status == "FINISHED", res.error
    m = MlflowClient(tracking_uri).get_run(res.run_id).data.metrics
    # the token mean over the whole test split, recomputed (evaluate's own loop) from the tested checkpoint
    from datamodules.instruct import InstructDataModule
    from pipelines.generate import load_generator

    model = load_generator(res.checkpoint)
    dm = InstructDataModule(source="python-docs", mode="text", max_length=32, batch_size=4, max_records=3,
                            test_fraction=0.05)
    dm.set_tokenizer(model.tokenizer)
    dm.setup("test")
    assert m["test/loss"] == pytest.approx(model.evaluate(dm.test_dataloader()), rel=1e-4)
    assert m["test/ppl"] == pytest.approx(math.exp(m["test/loss"]), rel=1e-4)


TINY_BASE = {
    "seed_everything": 1,
    "trainer": {"max_steps": 3, "limit_val_batches": 0, "accelerator": "cpu", "enable_progress_bar": False},
    "model": {"class_path": "modules.gpt.module.GPTModule",
              "init_args": {"n_layer": 1, "n_head": 2, "n_embd": 32, "warmup_steps": 1, "sample_tokens": 0}},
    "data": {"class_path": "datamodules.shakespeare.ShakespeareDataModule",
             "init_args": {"corpus": "shakespeare-plays", "tokenizer": "byte", "block_size": 32, "batch_size": 4,
                           "max_chars": 20000}},
}


def test_study_pretrains_its_base_as_a_stage_run_in_the_given_store(tmp_path, tracking_uri):
    """Each stage is a visible MLflow run; the fine-tunes record it as their input; a non-default
    --tracking_uri is honoured by every stage; a second study reuses the finished stage."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    study = {
        "name": "lora-stage", "base": str(ROOT / "configs" / "finetune" / "minigpt_lora.yaml"),
        "stages": {"base": {"config": "base.yaml"}},
        "overrides": {"model.init_args.backbone": "runs:/{stages.base}", "trainer.max_steps": 2,
                      "trainer.val_check_interval": 2, "trainer.limit_val_batches": 1,
                      "data.init_args.max_length": 32, "data.init_args.batch_size": 4,
                      "data.init_args.max_records": 6, "model.init_args.export": False},
        "variants": {"lora": {"model.init_args.r": 2}},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    elsewhere = tmp_path / "team" / "store.db"
    uri = f"sqlite:///{elsewhere}"
    parent, table = run_study(tmp_path / "study.yaml", ["--system_metrics=false"], uri)
    df = table.summary
    assert list(df["status"]) == ["FINISHED"] and list(df["variant"]) == ["lora"]  # the stage is no variant
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], "tags.`mlflow.parentRunId` = '" + parent + "'")
    (stage,) = [r for r in runs if r.data.tags["practicum.role"] == "stage"]
    (lora,) = [r for r in runs if r.data.tags["practicum.role"] == "variant"]
    assert stage.info.status == "FINISHED" and stage.data.tags["practicum.project"] == "gpt"
    assert json.loads(lora.data.tags["practicum.inputs"]) == {"model.init_args.backbone": f"runs:/{stage.info.run_id}"}
    assert json.loads(client.get_run(parent).data.tags["practicum.stages"]) == {"base": stage.info.run_id}
    default = MlflowClient(tracking_uri)  # the working directory's store saw nothing
    assert not default.search_runs([e.experiment_id for e in default.search_experiments()])

    again, table2 = run_study(tmp_path / "study.yaml", ["--system_metrics=false"], uri)
    df2 = table2.summary
    assert json.loads(client.get_run(again).data.tags["practicum.stages"]) == {"base": stage.info.run_id}
    stages = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`practicum.role` = 'stage'")
    assert len(stages) == 1  # reused, not pretrained again
    assert df2["val/loss"].tolist() == df["val/loss"].tolist()  # the fine-tune is the same either way

    # study overrides of the variants' model do not reach the stage; a trainer override does, and
    # changes what the stage is, so the stage runs anew
    run_study(tmp_path / "study.yaml", ["--system_metrics=false", "--model.init_args.r=4",
                                        "--trainer.enable_model_summary=false"], uri)
    stages = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`practicum.role` = 'stage'")
    assert len(stages) == 2 and all(r.info.status == "FINISHED" for r in stages)
