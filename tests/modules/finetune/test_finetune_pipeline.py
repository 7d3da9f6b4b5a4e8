"""The fine-tuning project through the real pipeline into a temporary MLflow store, and every
shipped config (run configs and the study) parsed against the classes' signatures."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from jsonargparse import ArgumentParser
from mlflow.tracking import MlflowClient

from pipelines.run import run_experiment
from pipelines.study import load_study

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--config", action="config")
    p.add_argument("--seed_everything", type=int, default=0)
    p.add_argument("--trainer", type=dict, default={})
    p.add_subclass_arguments(L.LightningModule, "model")
    p.add_subclass_arguments(L.LightningDataModule, "data")
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path):
    # parsing checks every class_path and init_args name and type; instantiating the HF configs
    # would download models, so the run test below instantiates the mini-GPT one for real
    cfg = parser().parse_args(["--config", str(path)])
    assert cfg.model.class_path.startswith(("modules.finetune.", "modules.gpt."))


def test_study_variants_parse():
    study = load_study(ROOT / "configs" / "studies" / "lora-vs-full.yaml")
    assert set(study.variants) == {"full", "lora-r8", "lora-r64", "qlora-r64"}
    assert study.variants["qlora-r64"]["requires"] == ["cuda", "bitsandbytes"]  # skipped, with a note, elsewhere
    methods = {}
    for name in study.variants:
        config, args = study.variant_config(name)
        cfg = parser().parse_args(["--config", str(config), *args])
        methods[name] = (cfg.model.init_args.method, cfg.model.init_args.r)
        assert cfg.trainer == parser().parse_args(["--config", str(study.base)]).trainer  # equal steps
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


@pytest.fixture
def current_uri(tracking_uri):
    """MLflow's process-wide tracking URI pointed at the test store (as inside a pipeline run)."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    yield tracking_uri
    mlflow.set_tracking_uri(before)


def test_backbone_from_an_mlflow_run_id(current_uri, tiny_minigpt_ckpt, tmp_path):
    from modules.finetune.backbone import resolve_backbone
    from modules.finetune.module import FinetuneModule

    client = MlflowClient(current_uri)
    run_id = client.create_run(client.create_experiment("gpt")).info.run_id
    client.log_artifact(run_id, tiny_minigpt_ckpt, "checkpoints")
    kind, path = resolve_backbone(run_id, tmp_path / "cache")
    assert kind == "minigpt" and Path(path).read_bytes() == Path(tiny_minigpt_ckpt).read_bytes()
    assert resolve_backbone(f"runs:/{run_id}", tmp_path / "cache") == (kind, path)
    module = FinetuneModule(backbone=run_id, method="lora", r=2, cache_dir=str(tmp_path / "cache"))
    module.configure_model()
    assert module.backbone.peft_config["default"].base_model_name_or_path == run_id  # the adapter's base
    with pytest.raises(ValueError, match="MLflow run id"):
        resolve_backbone("0" * 32, tmp_path / "cache")
