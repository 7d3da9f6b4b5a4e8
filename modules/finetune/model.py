"""The pieces of causal-LM fine-tuning that are not training plumbing.

- `MiniGPTForCausalLM`: the mini-GPT (`modules.gpt.model.GPT`) behind the call signature PEFT
  and the fine-tuning module use for Hugging Face models, `model(input_ids=..., attention_mask=...)`.
- `default_lr`: the learning rates practitioners use per method and model size.
- `causal_lm_loss`: next-token cross-entropy with Hugging Face's label convention.
- `sample`: text generation for either backbone kind.
- `weights_bytes`: size on disk of a saved model's weight files.

No lightning or mlflow import here: `module.py` trains these, `backbone.py` loads them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.text import IGNORE_INDEX
from modules.gpt.model import GPT

# Every nn.Linear inside the mini-GPT's blocks: attention qkv and output projections, MLP up and
# down projections ("c_proj" matches both attn.c_proj and mlp.c_proj: PEFT matches name suffixes).
# lm_head is left out like PEFT's "all-linear" leaves out the output layer; here it is also tied
# to the token embedding, so an adapter on it would silently change the input embedding too.
MINIGPT_TARGETS = ["c_attn", "c_proj", "c_fc"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


class MiniGPTForCausalLM(nn.Module):
    """The mini-GPT with the keyword call of a Hugging Face causal LM; returns logits (B, T, V).

    `attention_mask` is accepted and unused: batches are right-padded and attention is causal,
    so a real token never sees a pad that follows it, and pads carry label -100.

    Args:
        gpt: The mini-GPT to wrap (its Linear layers are what LoRA targets).
        name_or_path: Where the base weights came from; PEFT writes it into adapter_config.json
            as `base_model_name_or_path`, which is how an exported adapter finds its base.
    """

    def __init__(self, gpt: GPT, name_or_path: str | None = None):
        super().__init__()
        self.gpt = gpt
        self.name_or_path = name_or_path

    @property
    def block_size(self) -> int:
        return self.gpt.config.block_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        logits, _ = self.gpt(input_ids)
        return logits


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a PEFT wrapper (its adapter layers injected into it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) logits of a Hugging Face causal LM, a PEFT wrapper or `MiniGPTForCausalLM`."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    # prompt tuning's PEFT wrapper returns the virtual tokens' positions first: keep the inputs'
    return logits[:, -input_ids.size(1) :]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy and the number of target tokens.

    logits: (B, T, V); labels: (B, T) aligned with the inputs (Hugging Face convention), -100
    where there is no target. Position t predicts labels[t + 1], so both are shifted by one.
    """
    targets = labels[:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / max(n, 1), n


def default_lr(method: str, n_params: int) -> float:
    """Learning rate practitioners start from, by method and model size (AdamW).

    Full fine-tuning moves every weight, so its rate falls with model size: ~1e-5 for 7-8B
    models (Alpaca, Llama recipes 1e-5..2e-5), ~1e-4 for GPT-2-sized ones, 3e-4 for the tiny
    mini-GPTs here; 3e-4 * sqrt(1e7 / N) reproduces that range. LoRA trains a small low-rank
    update whose scale is fixed by alpha / r, and uses larger rates that depend far less on
    size: 2e-4 for 7B+ (QLoRA paper, most recipes), ~1e-3 for small models, up to 2e-3. The
    other parameter-efficient methods start from LoRA's rate (the peft-methods study tunes each).
    """
    n = max(int(n_params), 1)
    if method == "full":
        return float(min(3e-4, max(1e-5, 3e-4 * math.sqrt(1e7 / n))))
    return float(min(2e-3, max(2e-4, 1e-3 * (1e8 / n) ** 0.35)))


def quantize_nf4_(gpt: GPT, compute_dtype: torch.dtype = torch.bfloat16) -> GPT:
    """Replace the mini-GPT's block Linears by bitsandbytes 4-bit NF4 layers (QLoRA's base,
    Dettmers et al. 2023), in place. Needs CUDA: the weights are quantised when moved there."""
    import bitsandbytes as bnb

    for block in gpt.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                    )
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    if child.bias is not None:
                        q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                    setattr(parent, name, q.cuda())
    return gpt.cuda()


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Extend input_ids (1, T) by up to max_new_tokens; returns only the new ids (1, N).

    The mini-GPT samples with its own KV-cache loop and a seeded generator; a Hugging Face model
    (or its PEFT wrapper) goes through `generate` with the global RNG seeded. Temperature 0 is
    greedy for both.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    # a PEFT wrapper injects its LoRA layers into the model it wraps, so sampling from that
    # inner model still applies the adapters
    core = unwrap(model)
    if isinstance(core, MiniGPTForCausalLM):
        g = torch.Generator(device=input_ids.device).manual_seed(seed)
        out = core.gpt.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
        return out[:, input_ids.size(1) :]
    torch.manual_seed(seed)
    # use_cache: training switches the config's KV cache off; sampling wants it back
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "use_cache": True}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or 0)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        eos_token_id=eos_token_id, pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
        **kwargs,
    )
    return out[:, input_ids.size(1) :]


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a saved model folder (configs, tokenizer and READMEs excluded)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.suffix in WEIGHT_SUFFIXES)
