"""The scalar heads of RLHF on a causal LM: the reward model's and PPO's value head. Pure PyTorch.

A head reads the backbone's last hidden state (after the final norm, the input of the LM head):
the reward model at the last real token of prompt + answer, one scalar per sequence (InstructGPT,
Ouyang et al. 2022, section 3.5), or summed over every real token (`pooling="sum"`); the value
head at every position, V(s_t) per token.
"""

from __future__ import annotations

import torch
from torch import nn

from modules.finetune.model import MiniGPTForCausalLM


def hidden_size(model: nn.Module) -> int:
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(core, MiniGPTForCausalLM):
        return core.gpt.config.n_embd
    return core.config.hidden_size


def hidden_and_logits(model: nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states (B, T, C), logits (B, T, V)) of a mini-GPT, a Hugging Face LM or a PEFT wrapper."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(core, MiniGPTForCausalLM):
        seen: list[torch.Tensor] = []
        hook = core.gpt.transformer.ln_f.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            logits = model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            hook.remove()
        return seen[-1], logits
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def last_token(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """h (B, T, C) at each row's last real token (right padding) -> (B, C)."""
    last = attention_mask.long().sum(1) - 1
    return h[torch.arange(h.size(0), device=h.device), last]


POOLINGS = ("last", "sum")


class RewardModel(nn.Module):
    """r(x, y): a causal LM with a linear head on its hidden states.

    Args:
        backbone: A causal LM (`MiniGPTForCausalLM`, a Hugging Face model or a PEFT wrapper).
        head: Linear(C, 1); None makes a new one (zero bias, small weights: rewards start near 0).
        pooling: "last": the head reads the last real token (InstructGPT's reward model, TRL's
            `AutoModelForSequenceClassification`): the backbone must carry the whole answer's worth
            into one position. "sum": the head scores every real token and the scores add up, the
            form of a lexicon score such as VADER's (a sum of word valences). Under causal attention
            the prompt's tokens score alike for every answer to it, so a pair's difference
            r(x, y_w) - r(x, y_l), all the Bradley-Terry loss reads, depends on the answers alone.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"RewardModel pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        self.head = head if head is not None else nn.Linear(hidden_size(backbone), 1)
        if head is None:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden_size(backbone) + 1) ** 0.5)
            nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h, _ = hidden_and_logits(self.backbone, input_ids, attention_mask)
        if self.pooling == "last":
            return self.head(last_token(h, attention_mask).float()).squeeze(-1)  # (B,)
        return (self.head(h.float()).squeeze(-1) * attention_mask.float()).sum(1)  # (B,)
