"""A trained fine-tune back from disk, ready to generate: `practicum generate` calls
`load_for_generation` for a folder whose practicum.json names it (`modules.finetune.export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modules.finetune.methods import lookup
from modules.finetune.module import FinetuneModule


def load_for_generation(path: str | Path, **overrides: Any) -> FinetuneModule:
    """A FinetuneModule with `generate_text`, from anything a fine-tune exports or saves.

    `path` may be an adapter folder (adapter_config.json: its base is loaded, then the
    adapter), a merged folder (Hugging Face config.json, or a mini-GPT model.ckpt), a
    FinetuneModule Lightning checkpoint, or any backbone spec `FinetuneModule` accepts.
    """
    path = Path(path)
    marker = path / "practicum.json"
    # folders exported before the marker named a method hold LoRA (PEFT) adapters or merged models
    method = json.loads(marker.read_text()).get("method", "lora") if marker.is_file() else "lora"
    spec = lookup(method)
    if (path / spec.config_file).exists():
        base = json.loads((path / spec.config_file).read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}/{spec.config_file} names no base_model_name_or_path; cannot rebuild the base")
        module = FinetuneModule(backbone=base, method="full", export=False, **overrides)
        module.configure_model()
        # the saved adapter, not a fresh one: its own config (rank, targets) comes from the folder
        module.backbone = spec.load(module.backbone, path)
        module.method, module.spec = method, spec
    elif path.is_file() and path.suffix == ".ckpt" and is_finetune_checkpoint(path):
        # load_from_checkpoint builds the backbone (configure_model) before loading the state dict
        module = FinetuneModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, export=False,
                                                      **overrides)
    else:
        module = FinetuneModule(backbone=str(path), method="full", export=False, **overrides)
        module.configure_model()
    return module.eval()


def is_finetune_checkpoint(path: Path) -> bool:
    """A FinetuneModule's own checkpoint (its hyper-parameters name a method), not a mini-GPT's."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # never runs code
    return "method" in ckpt.get("hyper_parameters", {})
