"""The fine-tuning methods, one table: how each turns a loaded base into the model that trains,
and how its trained part is saved and loaded back.

- `full`: every weight trains.
- `lora` / `qlora` (Hu et al. 2021; Dettmers et al. 2023, over a 4-bit NF4 base): W + (alpha/r) B A.
- `dora` (Liu et al. 2024): LoRA's update split into a trained magnitude per output and a direction.
- `ia3` (Liu et al. 2022, "(IA)^3"): a trained vector rescales the keys, values and the MLP's input
  to its down projection.
- `vera` (Kopiczko et al. 2024): frozen random A and B shared by all layers, two trained scaling
  vectors per layer.
- `loha` (Hyeon-Woo et al. 2022, FedPara): the update is the Hadamard product of two low-rank products.
- `prefix` (Li & Liang 2021): trained keys and values prepended in every layer's attention.
- `prompt` (Lester et al. 2021): trained embeddings prepended to the input.
- `adapter` (Houlsby et al. 2019): a bottleneck MLP after each attention and MLP block, by hand
  (`modules.finetune.adapter`); every other method goes through PEFT.

`FinetuneModule` looks its method up here and never branches on its name. No lightning import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from modules.finetune.adapter import (
    CONFIG_FILE,
    HF_OUTPUTS,
    MINIGPT_OUTPUTS,
    BottleneckConfig,
    add_bottleneck_adapters,
    load_bottleneck,
    save_bottleneck,
)
from modules.finetune.model import MINIGPT_TARGETS, unwrap


@dataclass(frozen=True)
class MethodArgs:
    """The module's arguments a method reads (`FinetuneModule` documents each)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    use_dora: bool = False
    num_virtual_tokens: int = 16
    minigpt: bool = False


def _targets(a: MethodArgs) -> list[str] | str:
    """All linear projections of the blocks, unless named (PEFT's "all-linear" skips lm_head)."""
    if a.target_modules is not None:
        return a.target_modules
    return MINIGPT_TARGETS if a.minigpt else "all-linear"


def _rank(a: MethodArgs) -> None:
    if a.r < 1:
        raise ValueError(f"the rank r must be >= 1, got {a.r}")
    if not 0.0 <= a.dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {a.dropout}")


def _task(a: MethodArgs) -> str | None:
    return None if a.minigpt else "CAUSAL_LM"  # the mini-GPT is a plain nn.Module to PEFT


def lora(a: MethodArgs):
    """alpha None means 2 r, so the update's scale alpha / r stays 2 and one learning rate serves
    every rank."""
    from peft import LoraConfig

    _rank(a)
    return LoraConfig(r=a.r, lora_alpha=2 * a.r if a.alpha is None else a.alpha, lora_dropout=a.dropout,
                      target_modules=_targets(a), use_dora=a.use_dora, bias="none", task_type=_task(a))


def ia3(a: MethodArgs):
    """Keys, values and the MLP's down projection (PEFT's defaults for Llama); on the mini-GPT
    its fused qkv projection (queries too) and mlp.c_proj. Named targets are scaled at their output."""
    from peft import IA3Config

    if a.target_modules is not None:
        return IA3Config(target_modules=a.target_modules, feedforward_modules=[], task_type=_task(a))
    if a.minigpt:
        return IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], task_type=None)
    return IA3Config(task_type="CAUSAL_LM")


def vera(a: MethodArgs):
    from peft import VeraConfig

    _rank(a)
    return VeraConfig(r=a.r, target_modules=_targets(a), vera_dropout=a.dropout, save_projection=True,
                      task_type=_task(a))


def loha(a: MethodArgs):
    from peft import LoHaConfig

    _rank(a)
    return LoHaConfig(r=a.r, alpha=2 * a.r if a.alpha is None else a.alpha, target_modules=_targets(a),
                      task_type=_task(a))


def _virtual_tokens(cls_name: str) -> Callable[[MethodArgs], Any]:
    def make(a: MethodArgs):
        import peft

        if a.minigpt:
            raise ValueError(f"{cls_name.removesuffix('Config')} needs a Hugging Face backbone: PEFT feeds the "
                             "virtual tokens through inputs_embeds / past_key_values, which the mini-GPT does not "
                             "take; use lora, dora, ia3, vera, loha or adapter on it")
        if a.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {a.num_virtual_tokens}")
        return getattr(peft, cls_name)(num_virtual_tokens=a.num_virtual_tokens, task_type="CAUSAL_LM")

    return make


def bottleneck(a: MethodArgs) -> BottleneckConfig:
    targets = a.target_modules or (MINIGPT_OUTPUTS if a.minigpt else HF_OUTPUTS)
    return BottleneckConfig(width=a.r, target_modules=[targets] if isinstance(targets, str) else list(targets))


def peft_attach(base: nn.Module, config: Any) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(base, copy.deepcopy(config))  # PEFT resolves "all-linear" in place


def peft_save(model: nn.Module, folder: Path, hf: bool) -> None:
    # the mini-GPT has no vocabulary config for PEFT to inspect; its embeddings are never adapted
    model.save_pretrained(folder, save_embedding_layers="auto" if hf else False)


def peft_load(base: nn.Module, folder: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder))


def adapter_attach(base: nn.Module, config: BottleneckConfig) -> nn.Module:
    return add_bottleneck_adapters(base, config)


def adapter_save(model: nn.Module, folder: Path, hf: bool) -> None:
    config = replace(model.bottleneck_config, base_model_name_or_path=getattr(unwrap(model), "name_or_path", None))
    save_bottleneck(model, folder, config)


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Args:
        configure: The method's config from the module's arguments, made (and so checked) when
            the module is constructed; None: nothing to configure (full fine-tuning).
        attach: base + config -> the model that trains (base frozen, adapters trainable).
        save: Writes the trained part alone to a folder; load puts it back on a fresh base.
        config_file: The file in a saved folder that names the base (`base_model_name_or_path`).
        mergeable: The update folds into the base weights (a standalone merged export exists).
        quantize: Load the base in 4-bit NF4 first (QLoRA; CUDA and bitsandbytes).
        checkpointing: Trains under gradient checkpointing (a prefix's cache breaks the recompute
            of transformers' layers: keys of the prefix length against a mask that counts it twice).
    """

    configure: Callable[[MethodArgs], Any] | None
    attach: Callable[[nn.Module, Any], nn.Module] = peft_attach
    save: Callable[[nn.Module, Path, bool], None] = peft_save
    load: Callable[[nn.Module, Path], nn.Module] = peft_load
    config_file: str = "adapter_config.json"
    mergeable: bool = True
    quantize: bool = False
    checkpointing: bool = True


METHODS: dict[str, Method] = {
    "full": Method(configure=None),
    "lora": Method(lora),
    "qlora": Method(lora, quantize=True),
    "dora": Method(lambda a: lora(replace(a, use_dora=True))),
    "ia3": Method(ia3),
    "vera": Method(vera),
    "loha": Method(loha),
    "prefix": Method(_virtual_tokens("PrefixTuningConfig"), mergeable=False, checkpointing=False),
    "prompt": Method(_virtual_tokens("PromptTuningConfig"), mergeable=False),
    "adapter": Method(bottleneck, attach=adapter_attach, save=adapter_save, load=load_bottleneck,
                      config_file=CONFIG_FILE, mergeable=False),
}


def lookup(name: str, use_dora: bool = False, gradient_checkpointing: bool = False) -> Method:
    """The row of method `name`, after checking the options it does not allow."""
    if name not in METHODS:
        raise ValueError(f"FinetuneModule.method must be one of {tuple(METHODS)}, got {name!r}")
    if gradient_checkpointing and not METHODS[name].checkpointing:
        raise ValueError(f"FinetuneModule.method={name!r} does not train under gradient_checkpointing; set it false")
    if use_dora and name not in ("lora", "qlora"):
        raise ValueError(f"FinetuneModule.use_dora applies to method='lora' or 'qlora', not {name!r}")
    return METHODS[name]
