"""The bottleneck adapter of Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for
NLP", arXiv 1902.00751), by hand: the first parameter-efficient fine-tuning method.

Each adapter is a small residual MLP on a sublayer's output, before the residual addition
(their figure 2): h -> h + W_up f(W_down h + b_down) + b_up, with W_down (m x d), W_up (d x m),
m << d. W_up and b_up start at zero (the paper's "near-identity" initialisation, made exact),
so the adapted model equals the base at step 0 and training starts from the pretrained
function. One adapter follows the attention block's output projection and one the MLP's, in
every layer; the base stays frozen. Per adapter, 2 m d + m + d trainable weights
(`bottleneck_params`). Houlsby et al. also train the layer norms; here they stay frozen, so
the count is the adapters' alone (the `adapters` library's sequential bottleneck does the same).

Pure PyTorch: `modules.finetune.methods` puts it in the method table beside PEFT's methods.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
# the output projection of each sublayer: the mini-GPT's attn.c_proj and mlp.c_proj, Llama's
# (and Mistral's) self_attn.o_proj and mlp.down_proj
MINIGPT_OUTPUTS = ["attn.c_proj", "mlp.c_proj"]
HF_OUTPUTS = ["o_proj", "down_proj"]


def bottleneck_params(d: int, m: int) -> int:
    """Trainable weights of one adapter on a width-d sublayer: W_down (m x d) + b_down (m) +
    W_up (d x m) + b_up (d)."""
    return 2 * m * d + m + d


@dataclass
class BottleneckConfig:
    """Where the adapters go and how wide they are.

    Args:
        width: Bottleneck width m (Houlsby et al. tried 8..256; d / 16 is the `adapters` default).
        target_modules: Name suffixes of the Linear layers whose output each adapter follows.
        base_model_name_or_path: The base the adapter was trained on (written on save).
    """

    width: int = 8
    target_modules: list[str] = field(default_factory=lambda: list(HF_OUTPUTS))
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"the bottleneck adapter's width (FinetuneModule.r) must be >= 1, got {self.width}")


class Bottleneck(nn.Module):
    """A sublayer's output projection followed by its adapter: y = W x; y + up(silu(down(y)))."""

    def __init__(self, base: nn.Linear, width: int):
        super().__init__()
        d = base.out_features
        self.base = base
        self.down = nn.Linear(d, width, device=base.weight.device)
        self.act = nn.SiLU()  # the `adapters` library's Houlsby configuration uses swish
        self.up = nn.Linear(width, d, device=base.weight.device)
        nn.init.zeros_(self.up.weight)  # identity at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, d)
        h = self.up(self.act(self.down(y.to(self.down.weight.dtype))))  # (B, T, m) inside
        return y + h.to(y.dtype)


def add_bottleneck_adapters(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Freeze `model` and put an adapter after every Linear whose name ends in a target; in place."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in config.target_modules)]
    if not names:
        raise ValueError(f"no Linear layer matches the bottleneck adapter's targets {config.target_modules}; "
                         "set FinetuneModule.target_modules to the names of the sublayers' output projections")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Bottleneck(getattr(owner, child), config.width))
    model.bottleneck_config = config  # what `save_bottleneck` writes beside the weights
    return model


def save_bottleneck(model: nn.Module, folder: Path, config: BottleneckConfig) -> None:
    """The adapters' weights (safetensors) and their config, which names the base."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def load_bottleneck(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with the adapters saved in `folder` put back."""
    from safetensors.torch import load_file

    config = BottleneckConfig(**json.loads((Path(folder) / CONFIG_FILE).read_text()))
    model = add_bottleneck_adapters(base, config)
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise KeyError(f"{folder} holds adapters for other layers: missing {sorted(expected - set(state))[:3]}, "
                       f"unexpected {sorted(set(state) - expected)[:3]}")
    model.load_state_dict(state, strict=False)
    return model
