"""Where a fine-tuning backbone comes from.

A backbone spec is one string:

- a mini-GPT checkpoint (``*.ckpt`` from Project 1, or a folder holding one: the merged
  export of a mini-GPT fine-tune is such a folder);
- a Hugging Face causal LM: a local folder with ``config.json`` or a hub id.

An earlier MLflow run is named as ``runs:/<run id>`` in the config; the pipeline fetches its
checkpoint and hands this module the local file (so the lora-vs-full study pretrains its base as
a run of its own, then fine-tunes it).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})(/.*)?$")


def resolve_backbone(spec: str) -> tuple[str, str]:
    """("minigpt", checkpoint path) or ("hf", folder or hub id) for a backbone spec."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ValueError(
                f"backbone {spec!r} is a file but not a mini-GPT .ckpt; give a checkpoint, a Hugging Face "
                "model folder or hub id, or runs:/<run id> of a mini-GPT run"
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
    if RUN_ID.match(spec):
        raise ValueError(
            f"backbone {spec!r} names an MLflow run: `practicum run` fetches it (as runs:/<run id>) from the run's "
            "tracking store; outside the pipeline, download its checkpoint (mlflow.artifacts.download_artifacts) "
            "and pass the file"
        )
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


def load_minigpt(checkpoint: str) -> torch.nn.Module:
    """The GPT of a Project 1 checkpoint."""
    from modules.gpt.module import GPTModule

    return GPTModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).model


def load_tokenizer(kind: str, source: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a resolved backbone, without its weights.

    A data module tokenises in `setup`, which Lightning calls before `configure_model` builds
    the model, so the tokenizer has to come on its own: a Project 1 checkpoint carries it
    (`GPTModule.on_save_checkpoint`), a Hugging Face model has its tokenizer files.
    """
    if kind == "hf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    from datamodules.tokenizers import tokenizer_from_state

    state = torch.load(source, map_location="cpu", weights_only=True, mmap=True).get("tokenizer")
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
    """AutoModelForCausalLM from a folder or hub id; 4-bit NF4 for QLoRA.

    A folder with a config.json and no weight files is an architecture to start from random
    weights (set by the seed): configs/finetune/arch/tiny-llama, pretrained by a study stage.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    folder = Path(source)
    if folder.is_dir() and not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()) and not quantize_4bit:
        warnings.warn(f"backbone {source} holds an architecture and no weights: the model starts from random weights")
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code),
                                                **kwargs)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if dtype in ("auto", "float32") else torch_dtype(dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def require_cuda_4bit() -> None:
    """QLoRA's 4-bit NF4 base needs bitsandbytes' CUDA kernels: say so before any loading."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "FinetuneModule.method='qlora' needs a CUDA GPU (bitsandbytes 4-bit NF4 kernels), and none "
            "is available; use method='lora' on this machine (`practicum estimate` predicts QLoRA's memory here)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("method='qlora' needs bitsandbytes: pip install 'practicum[qlora]'") from None


def empty_base(arch: Any, dtype: str = "float32", attn_implementation: str | None = None,
               device: str | torch.device = "meta") -> torch.nn.Module:
    """A backbone's architecture without its weights (on the meta device), for the memory estimate.

    `arch` is a Hugging Face config (or a folder / config.json holding one) or a mini-GPT
    `GPTConfig`; the result is what `load_hf` or `load_minigpt` would give for those weights,
    ready for `FinetuneModule.build`.
    """
    from modules.finetune.model import MiniGPTForCausalLM
    from modules.gpt.model import GPT, GPTConfig

    dt = torch_dtype("float32" if dtype == "auto" else dtype)
    with torch.device(device):
        if isinstance(arch, GPTConfig):
            return MiniGPTForCausalLM(GPT(arch).to(dt))
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

        cfg = arch if isinstance(arch, PretrainedConfig) else AutoConfig.from_pretrained(
            str(Path(arch).parent if str(arch).endswith(".json") else arch))
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return AutoModelForCausalLM.from_config(cfg, dtype=dt, **kw)
