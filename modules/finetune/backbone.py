"""Where a fine-tuning backbone comes from, and the embedded study's pretrained base.

A backbone spec is one string:

- a mini-GPT checkpoint (``*.ckpt`` from Project 1, or a folder holding one: the merged
  export of a mini-GPT fine-tune is such a folder);
- an MLflow run id (32 hex digits, or ``runs:/<id>``) of a mini-GPT run: its checkpoint
  artifact is downloaded with the current tracking URI;
- a Hugging Face causal LM: a local folder with ``config.json`` or a hub id.

``pretrained_base`` trains the default base (a mini-GPT on Shakespeare, from a GPT config)
once and caches its checkpoint under ``<cache_dir>/minigpt-<hash of the config>/``, so every
later run of the study starts from the same weights without pretraining again.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})(/.*)?$")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_backbone(spec: str, cache_dir: str | Path) -> tuple[str, str]:
    """("minigpt", checkpoint path) or ("hf", folder or hub id) for a backbone spec."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ValueError(
                f"backbone {spec!r} is a file but not a mini-GPT .ckpt; give a checkpoint, a Hugging Face "
                "model folder or hub id, or an MLflow run id"
            )
        return "minigpt", str(path.resolve())
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf", str(path.resolve())
        ckpts = sorted(path.glob("*.ckpt"))
        if ckpts:
            return "minigpt", str(pick_checkpoint([str(c) for c in ckpts]))
        raise FileNotFoundError(
            f"backbone folder {spec!r} has neither config.json (a Hugging Face model) nor a .ckpt (a mini-GPT)"
        )
    m = RUN_ID.match(spec)
    if m:
        return "minigpt", download_run_checkpoint(m.group(2), cache_dir)
    if spec.startswith((".", "/", "~")) or spec.endswith(".ckpt"):
        raise FileNotFoundError(f"backbone {spec!r} does not exist (resolved to {path.resolve()})")
    return "hf", spec  # a hub id: from_pretrained downloads it (needs the network)


def pick_checkpoint(paths: list[str]) -> str:
    """last.ckpt if present, else the one with the highest step=N in its name, else the last sorted."""
    names = {Path(p).name: p for p in paths}
    if "last.ckpt" in names:
        return names["last.ckpt"]

    def step(p: str) -> int:
        m = re.search(r"step=(\d+)", Path(p).name)
        return int(m.group(1)) if m else -1

    return max(sorted(paths), key=step)


def current_tracking_uri() -> str:
    """MLflow's tracking URI when one was set (mlflow.set_tracking_uri, MLFLOW_TRACKING_URI),
    else Practicum's default store (where `practicum run` records runs)."""
    from mlflow.tracking import get_tracking_uri, is_tracking_uri_set

    from pipelines.tracking import resolve_tracking_uri

    return get_tracking_uri() if is_tracking_uri_set() else resolve_tracking_uri()


def download_run_checkpoint(run_id: str, cache_dir: str | Path) -> str:
    """The checkpoint artifact of MLflow run `run_id`, downloaded (once) under cache_dir."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = current_tracking_uri()
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except Exception as e:
        raise ValueError(f"backbone {run_id!r} looks like an MLflow run id but run lookup at {uri!r} failed: {e}") from None

    def walk(path: str | None) -> list[str]:
        out = []
        for a in client.list_artifacts(run_id, path):
            out += walk(a.path) if a.is_dir else [a.path]
        return out

    ckpts = [p for p in walk(None) if p.endswith(".ckpt")]
    if not ckpts:
        raise FileNotFoundError(f"MLflow run {run_id} has no .ckpt artifact to fine-tune from")
    chosen = pick_checkpoint(ckpts)
    dst = Path(cache_dir) / f"mlflow-{run_id}"
    local = dst / Path(chosen).name  # a single-file download lands flat in dst_path
    if not local.exists():
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=chosen, dst_path=str(dst), tracking_uri=uri
        ))
    return str(local.resolve())


def load_minigpt(checkpoint: str) -> torch.nn.Module:
    """The GPT of a Project 1 checkpoint."""
    from modules.gpt.module import GPTModule

    return GPTModule.load_from_checkpoint(checkpoint, map_location="cpu").model


def load_tokenizer(kind: str, source: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a resolved backbone, without its weights.

    A data module tokenises in `setup`, which Lightning calls before `configure_model` builds
    the model, so the tokenizer has to come on its own: a Project 1 checkpoint carries it
    (`GPTModule.on_save_checkpoint`), a Hugging Face model has its tokenizer files.
    """
    if kind == "hf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    from modules.gpt.tokenizer import tokenizer_from_state

    state = torch.load(source, map_location="cpu", weights_only=False, mmap=True).get("tokenizer")
    if state is None:
        raise ValueError(f"mini-GPT checkpoint {source} carries no tokenizer; save it from a GPTModule fit")
    return tokenizer_from_state(state)


def torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes) + ['auto']}, got {name!r}")
    return dtypes[name]


def load_hf(
    source: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    quantize_4bit: bool = False,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """AutoModelForCausalLM from a folder or hub id; 4-bit NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if dtype in ("auto", "float32") else torch_dtype(dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def find_config(path: str) -> Path:
    """A config path as given, else relative to the repository (runs started elsewhere)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    raise FileNotFoundError(f"base_config {path!r} not found (also looked under {REPO_ROOT})")


def pretrained_base(config_path: str, cache_dir: str | Path) -> str:
    """Checkpoint of the mini-GPT that `config_path` (a Project 1 run config) trains; trained
    once, then reused: the cache key is the sha256 of the config text and the torch version."""
    cfg_file = find_config(config_path)
    text = cfg_file.read_text()
    key = hashlib.sha256((text + torch.__version__).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"minigpt-{key}" / "base.ckpt"
    if target.exists():
        return str(target.resolve())

    with global_rng_kept():
        return _pretrain(text, target)


def _pretrain(text: str, target: Path) -> str:
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed_everything", type=int, default=0)
    parser.add_argument("--trainer", type=dict, default={})
    parser.add_subclass_arguments(L.LightningModule, "model")
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    cfg = parser.parse_string(text)
    L.seed_everything(cfg.seed_everything, workers=True)
    objs = parser.instantiate(cfg)
    trainer_kwargs = {k: v for k, v in dict(cfg.trainer).items() if k not in ("logger", "callbacks")}
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(objs.model, datamodule=objs.data)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.part")
    trainer.save_checkpoint(tmp)
    (target.parent / "config.yaml").write_text(text)
    tmp.replace(target)  # atomic: a concurrent run never reads a half-written file
    return str(target.resolve())


@contextmanager
def global_rng_kept() -> Iterator[None]:
    """Put Python's, NumPy's and torch's global RNGs (and Lightning's seed variables) back afterwards.

    Pretraining the base reseeds and draws from them; the fine-tune that asked for the base must
    then draw the same numbers (LoRA init, data order) whether the base came from the cache or not.
    """
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    env = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
