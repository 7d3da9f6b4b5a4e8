"""What a fine-tune leaves behind: the adapter alone and the merged model, each a folder that
`practicum generate` (through `modules.finetune.load.load_for_generation`) and PEFT or
`from_pretrained` read back.

The functions take the trained `FinetuneModule` (its backbone, kind, method and tokenizer); they
do not import it, so the module can call them at the end of fit.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from modules.artifacts import log_file
from modules.finetune.model import weights_bytes

# the loader `practicum generate` imports for a folder written here (a string: no import cycle)
LOADER = "modules.finetune.load.load_for_generation"


def export_and_log(module: Any, export_dir: str | None) -> dict[str, float]:
    """Save the adapter (not for full fine-tuning) and the merged model (where the method's update
    folds into the weights), log both folders as
    artifacts and their sizes as `disk/adapter_bytes` and `disk/full_checkpoint_bytes`.

    With `export_dir` None the folders live in a temporary directory, removed once logged.
    """
    root = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="finetune-export-"))
    try:
        metrics = {}
        if module.adapter is not None:
            save_adapter(module, root / "adapter")
            metrics["disk/adapter_bytes"] = float(weights_bytes(root / "adapter"))
            log_file(module.loggers, root / "adapter", "adapter")
        if module.spec.mergeable:  # a bottleneck, prefix or prompt does not fold into the weights
            save_merged(module, root / "merged")
            metrics["disk/full_checkpoint_bytes"] = float(weights_bytes(root / "merged"))
            log_file(module.loggers, root / "merged", "merged")
        module._log_now(metrics)
        return metrics
    finally:
        if not export_dir:
            shutil.rmtree(root, ignore_errors=True)


def save_adapter(module: Any, folder: str | Path) -> Path:
    """The trained part alone, in its method's format (PEFT's; a bottleneck's own), naming its base."""
    if module.adapter is None:
        raise ValueError("method='full' has no adapter; use save_merged")
    module.configure_model()
    folder = Path(folder)
    module.spec.save(module.backbone, folder, module.kind == "hf")
    if module.kind == "hf":
        module.tokenizer.save_pretrained(folder)
    write_loader_marker(folder, module.method)
    return folder


def save_merged(module: Any, folder: str | Path) -> Path:
    """A standalone model with the adapter folded in (W + alpha/r B A), loadable without PEFT.

    The adapter is merged into a freshly loaded full-precision base rather than into the
    training copy, so a 4-bit QLoRA base is not merged lossily and training state is untouched.
    """
    if not module.spec.mergeable:
        raise ValueError(f"method={module.method!r} does not fold into the weights (no merged model); use save_adapter")
    module.configure_model()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if module.adapter is None:
        model = module.backbone
    else:
        with tempfile.TemporaryDirectory() as tmp:
            module.spec.save(module.backbone, Path(tmp), module.kind == "hf")
            model = module.spec.load(module._load_base(quantize=False), Path(tmp)).merge_and_unload()
    if module.kind == "hf":
        model.save_pretrained(folder)
        module.tokenizer.save_pretrained(folder)
    else:
        save_minigpt(model.gpt, module.tokenizer, folder / "model.ckpt")
    write_loader_marker(folder, "full")
    return folder


def write_loader_marker(folder: Path, method: str) -> None:
    """practicum.json names the loader, so `practicum generate <folder>` finds it, and the method
    whose format the folder holds."""
    (Path(folder) / "practicum.json").write_text(json.dumps({"loader": LOADER, "method": method}) + "\n")


def save_minigpt(gpt: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Save a mini-GPT as a Lightning checkpoint of Project 1: `GPTModule.load_from_checkpoint` reads
    it (and so does a fine-tune naming it as its backbone)."""
    import lightning as L

    from modules.gpt.module import GPTModule

    config = dataclasses.asdict(gpt.config)
    accepted = inspect.signature(GPTModule.__init__).parameters
    gm = GPTModule(**{k: v for k, v in config.items() if k in accepted})
    gm.model.load_state_dict(gpt.state_dict())
    gm.tokenizer = tokenizer
    checkpoint = {
        "state_dict": gm.state_dict(),
        "hyper_parameters": dict(gm.hparams),
        "pytorch-lightning_version": L.__version__,
    }
    gm.on_save_checkpoint(checkpoint)  # adds the tokenizer
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
