"""`practicum estimate CONFIG`: a fine-tuning config's memory per GPU, predicted offline.

The prediction itself is fine-tuning math and lives beside the module that trains
(`modules.finetune.memory`). Here the pipeline's part: parse the run config with the run's own
parser, construct its model (construction loads nothing), find the backbone's architecture
without the network, and log the estimate as an MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from modules.finetune.memory import STRATEGIES, Estimate, estimate

# Hub ids the presets name → the architecture-only config.json shipped beside them (offline use).
ARCH_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "arch"
SHIPPED_ARCH = {"meta-llama/Meta-Llama-3-8B": "llama3-8b", "mistralai/Mistral-7B-v0.1": "mistral-7b"}


def estimate_config(config: str, overrides: Sequence[str] = (), arch: str | None = None, gpu: str | None = None,
                    devices: int = 1, strategy: str | None = None, optimizer: str = "adamw") -> Estimate:
    """The estimate of a run config: its model as `practicum run` would construct it, its trainer's
    precision and strategy, its data's batch size and sequence length."""
    from pipelines.checkpoint import locate
    from pipelines.config import PracticumCLI

    # the run's own parser: the same keys, defaults (the module's signature) and type checks
    cfg = PracticumCLI(["--config", config, *overrides]).config
    module = locate(cfg.model.class_path)(**vars(cfg.model.init_args))
    trainer = cfg.get("trainer") or {}
    data = vars(cfg.data.init_args) if cfg.get("data") else {}
    strategy = strategy or str(trainer.get("strategy") or "ddp")
    strategy = strategy if strategy in STRATEGIES else "fsdp" if "FSDP" in strategy else "ddp"
    return estimate(module, arch_source(cfg.model.init_args.get("backbone"), arch),
                    precision=str(trainer.get("precision") or "32-true"), batch_size=data.get("batch_size", 1),
                    seq_len=data.get("max_length", 256), optimizer=optimizer, strategy=strategy, devices=devices,
                    gpu=gpu)


def arch_source(backbone: str | None, arch: str | None) -> Any:
    """What `build` needs for a run config's backbone, offline: --arch, a local folder/config.json,
    a shipped architecture for a known hub id, or the mini-GPT base's GPTConfig."""
    if arch:
        return arch
    if backbone is None:
        return minigpt_config("configs/finetune/minigpt_base.yaml")  # the lora-vs-full study's base stage
    p = Path(backbone).expanduser()
    if p.is_dir() and (p / "config.json").exists() or p.suffix == ".json" and p.exists():
        return str(p)
    if backbone in SHIPPED_ARCH:
        return str(ARCH_DIR / SHIPPED_ARCH[backbone] / "config.json")
    try:  # the hub's config (the network, or the local Hugging Face cache)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(backbone)
    except OSError:
        raise LookupError(f"no architecture for backbone {backbone!r} offline: pass --arch PATH/config.json "
                          f"(shipped: {', '.join(SHIPPED_ARCH)})") from None


def minigpt_config(base_config: str):
    """The GPTConfig the mini-GPT base config trains (byte tokenizer: 256 ids)."""
    import dataclasses

    import yaml

    from modules.gpt.model import GPTConfig

    path = Path(base_config)
    if not path.exists():  # relative to the repository, for runs started elsewhere
        path = Path(__file__).resolve().parents[1] / base_config
    cfg = yaml.safe_load(path.read_text())
    init, data = cfg["model"].get("init_args") or {}, cfg["data"].get("init_args") or {}
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    kw = {k: v for k, v in init.items() if k in names and v is not None}
    kw.setdefault("block_size", data.get("block_size", 256))
    kw.setdefault("vocab_size", 256 if data.get("tokenizer") == "byte" else init.get("vocab_size") or 65)
    return GPTConfig(**kw)


def log_estimate(est: Estimate, experiment: str = "estimate", tracking_uri: str | None = None,
                 run_name: str | None = None, study: str | None = None, variant: str | None = None) -> str:
    """One MLflow run tagged practicum.role=estimate, with the setup as params; returns its id.

    With `study`, the run joins that study's latest parent run as a child (its experiment, tagged
    with `variant`), so `practicum compare STUDY` shows the estimate beside the measured variant.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipelines import tracking as trk

    uri = trk.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    tags = {**trk.environment_tags(), trk.TAG_ROLE: "estimate"}
    if study:
        from pipelines.compare import find_parent

        parent = find_parent(client, study)
        exp = parent.info.experiment_id
        tags.update({"mlflow.parentRunId": parent.info.run_id, trk.TAG_STUDY: study,
                     trk.TAG_VARIANT: variant or run_name or "estimate"})
    else:
        exp = trk.get_or_create_experiment(client, experiment, uri)
    run = client.create_run(exp, run_name=f"{variant or run_name} (estimate)" if study else run_name, tags=tags)
    params = {**est.setup, "gpu": est.gpu, "gpu_bytes": est.gpu_bytes}
    client.log_batch(run.info.run_id,
                     metrics=[Metric(k, v, 0, 0) for k, v in est.metrics().items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
