"""Predict a fine-tune's memory per GPU before renting one (`practicum estimate CONFIG`).

The model is the one `FinetuneModule.build` trains, built around its architecture on the meta
device (`modules.finetune.backbone.empty_base`), so parameter, gradient and optimizer bytes are
counted from the real parameter list, not from a parameter-count formula; activations come from
the per-layer model on the symbolic autograd tape (`modules.finetune.activations`). Keys are the
run ledger's (`mem/params_bytes`, ...) under `estimate/`, so `compare` shows them beside a
measured run; `estimate/mem/recompute_bytes` is one layer's activations, rebuilt in backward
under gradient checkpointing (absent from the ledger, present at the peak).
tests/modules/finetune/test_memory.py checks each key against a measured step of tiny Llama,
Mistral and mini-GPT models built by `FinetuneModule` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from modules.finetune.activations import activations, arch_of, layout_of
from modules.finetune.backbone import empty_base
from modules.finetune.model import unwrap
from modules.gpt.model import GPTConfig

GiB = 1024**3
# Memory of common training GPUs (bytes the driver reports, rounded to the marketing figure).
GPUS = {
    "H200-141GB": 141e9, "H100-80GB": 80 * GiB, "A100-80GB": 80 * GiB, "A100-40GB": 40 * GiB,
    "L40S-48GB": 48 * GiB, "A6000-48GB": 48 * GiB, "V100-32GB": 32 * GiB, "RTX5090-32GB": 32 * GiB,
    "L4-24GB": 24 * GiB, "A10G-24GB": 24 * GiB, "RTX4090-24GB": 24 * GiB, "RTX3090-24GB": 24 * GiB,
    "T4-16GB": 16 * GiB, "V100-16GB": 16 * GiB,
}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd_momentum")
STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = {"32": "32-true", "32-true": "32-true", "fp32": "32-true", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true"}
KEYS = ("params", "grads", "optimizer", "activations", "recompute")
# methods whose layers `modules.finetune.activations` writes out, each checked against a measured step
ACTIVATION_MODELS = ("full", "lora", "qlora", "dora", "ia3", "prefix", "adapter")


# ---------------------------------------------------------------------------- closed-form pieces


def nf4_bytes(n: int, blocksize: int = 64) -> int:
    """Bytes of one bitsandbytes `Params4bit` of n weights, NF4 with double quantisation
    (`compress_statistics=True`), as `bitsandbytes.functional.quantize_4bit` allocates them
    (Dettmers et al. 2023, QLoRA sec. 3): two 4-bit codes per uint8 byte, `(n + 1) // 2`; one
    absmax per 64-weight block, itself quantised by `quantize_blockwise(absmax, blocksize=256)`
    to one uint8 per block plus an fp32 absmax per 256 blocks; the fp32 mean subtracted first
    (`offset`) and the 16-entry fp32 NF4 code. The 256-entry fp32 dynamic map of the second
    quantisation is one tensor shared by every layer (`name2qmap`), counted by `qlora_shared`."""
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 + 16 * 4


QLORA_SHARED_BYTES = 256 * 4  # bitsandbytes' dynamic 8-bit map, one per process


def adam8bit_state_bytes(n: int) -> int:
    """bitsandbytes `Adam8bit`/`AdamW8bit` state of one n-element parameter (`Optimizer2State.
    init_state`, Dettmers et al. 2022): uint8 exp_avg and exp_avg_sq with one fp32 absmax each
    per 256-element block; tensors under `min_8bit_size` = 4096 elements keep fp32 states. The
    two 256-entry quantisation maps are shared by all parameters (2 KiB, left out)."""
    if n < 4096:
        return 2 * 4 * n
    return 2 * (n + 4 * -(-n // 256))


def optimizer_state_bytes(numel: int, el: int, optimizer: str) -> int:
    """State one trained tensor of `numel` elements of `el` bytes adds (torch.optim as of 2.x:
    Adam's exp_avg/exp_avg_sq take the parameter's dtype, `step` is an fp32 scalar tensor;
    SGD keeps a momentum buffer only when momentum != 0)."""
    if optimizer == "adamw":
        return 2 * numel * el + 4
    if optimizer == "adamw8bit":
        return adam8bit_state_bytes(numel)
    if optimizer == "sgd_momentum":
        return numel * el
    if optimizer == "sgd":
        return 0
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def parameter_bytes(model: torch.nn.Module, precision: str, optimizer: str, qlora: bool) -> dict[str, int]:
    """Parameter, gradient and optimizer bytes of the built model, each tensor counted once.

    Under QLoRA every Linear of the decoder layers becomes an NF4 `Params4bit` (transformers
    keeps lm_head: `get_keys_to_not_convert`) and every other frozen tensor is upcast to fp32
    (`prepare_model_for_kbit_training`). Gradients take the parameter's dtype."""
    head = unwrap(model).get_output_embeddings() if qlora else None
    quantised = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head} if qlora else set()
    out = dict.fromkeys(("params", "grads", "optimizer"), 0)
    for p in model.parameters():  # tied weights appear once
        el = p.element_size()
        if precision == "bf16-true" and p.is_floating_point():
            el = 2
        if id(p) in quantised and not p.requires_grad:  # LoRA's own A and B stay as they are
            out["params"] += nf4_bytes(p.numel())
            continue
        if qlora and not p.requires_grad:
            el = 4
        out["params"] += p.numel() * el
        if p.requires_grad:
            out["grads"] += p.numel() * el
            out["optimizer"] += optimizer_state_bytes(p.numel(), el, optimizer)
    if quantised:
        out["params"] += QLORA_SHARED_BYTES
    return out


# ---------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes per device of one training step, and the headroom on a GPU (negative: does not fit)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    recompute: int
    gpu: str | None = None
    gpu_bytes: float | None = None
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.recompute

    @property
    def headroom(self) -> float | None:
        return None if self.gpu_bytes is None else self.gpu_bytes - self.total

    def metrics(self) -> dict[str, float]:
        m = {f"estimate/mem/{k}_bytes": float(getattr(self, k)) for k in KEYS}
        m["estimate/mem/total_bytes"] = float(self.total)
        if self.headroom is not None:
            m["estimate/mem/headroom_bytes"] = float(self.headroom)
        return m

    def table(self) -> str:
        rows = [(k, getattr(self, k)) for k in KEYS] + [("total", self.total)]
        lines = [f"  {k:<12} {v / GiB:9.2f} GiB" for k, v in rows]
        if self.gpu_bytes is not None:
            verdict = "fits" if self.headroom >= 0 else "does NOT fit"
            lines.append(f"  {self.gpu or 'GPU'}: {self.gpu_bytes / GiB:.1f} GiB, headroom {self.headroom / GiB:.2f} GiB ({verdict})")
        return "\n".join(lines)


def gpu_bytes(gpu: str | None) -> tuple[str | None, float | None]:
    if gpu is None:
        return None, None
    if gpu.replace("_", "").isdigit():
        return "GPU", float(gpu.replace("_", ""))
    for name, b in GPUS.items():
        if gpu.lower() in (name.lower(), name.lower().rsplit("-", 1)[0]):
            return name, b
    raise LookupError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)} or give a byte count")


def shard(bytes_: dict[str, int], strategy: str, devices: int) -> dict[str, int]:
    """Per-device share under ZeRO (Rajbhandari et al. 2020, sec. 5): stage 2 shards gradients and
    optimizer state, stage 3 and FSDP's FULL_SHARD the parameters too; DDP replicates all.
    The all-gathered unit FSDP/ZeRO-3 holds during a layer's compute is left out (one layer)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n = max(1, devices)
    sharded = {"ddp": (), "deepspeed_stage_2": ("grads", "optimizer"),
               "fsdp": ("params", "grads", "optimizer"), "deepspeed_stage_3": ("params", "grads", "optimizer")}
    return {k: -(-v // n) if k in sharded[strategy] else v for k, v in bytes_.items()}


def estimate(module: Any, arch: Any, precision: str = "32-true", batch_size: int = 1, seq_len: int = 512,
             optimizer: str = "adamw", strategy: str = "ddp", devices: int = 1, gpu: str | None = None,
             cuda: bool = True) -> Estimate:
    """Predict one fine-tuning step's memory per device (see the module docstring).

    Args:
        module: The `FinetuneModule` of the config, constructed (construction loads nothing):
            its method, adapter, dtype, attention and checkpointing settings are the estimate's.
        arch: The backbone's architecture: a Hugging Face config (or a folder / config.json
            holding one) or the mini-GPT's `GPTConfig`.
        precision: Lightning's trainer precision ("32-true", "bf16-mixed", "bf16-true").
        batch_size, seq_len: Sequences per device per step and their length in tokens.
        optimizer: One of `OPTIMIZERS`; strategy one of `STRATEGIES`, over `devices` GPUs.
        gpu: A card of `GPUS` (or a byte count) to report the headroom on.
        cuda: CUDA kernels' saved tensors (False: CPU's, for the tests that measure here).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    precision = PRECISIONS[precision]
    if module.method not in ACTIVATION_MODELS:
        raise ValueError(f"the estimate models the activations of {', '.join(ACTIVATION_MODELS)}; "
                         f"method={module.method!r} is not among them")
    h = module.hparams
    if (module.kind == "hf") == isinstance(arch, GPTConfig):
        raise ValueError(f"the config's backbone is a {'Hugging Face model' if module.kind == 'hf' else 'mini-GPT'} "
                         f"but the architecture given is a {type(arch).__name__}; pass the backbone's own")
    qlora = module.method == "qlora"
    attn = h.attn_implementation or "sdpa"
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be sdpa, eager or flash_attention_2, got {attn!r}")
    attn = "eager" if attn == "eager" else "sdpa"  # flash keeps what the SDPA kernels keep
    # QLoRA's base computes in bf16; the NF4 layout of its weights is counted by parameter_bytes
    model = module.build(empty_base(arch, "bfloat16" if qlora else h.dtype, attn))
    b = parameter_bytes(model, precision, optimizer, qlora)
    lay = layout_of(model, precision, qlora, h.gradient_checkpointing)
    b["activations"], b["recompute"] = activations(arch_of(model), lay, batch_size, seq_len, precision,
                                                   h.gradient_checkpointing, attn, cuda)
    name, cap = gpu_bytes(gpu)
    setup = dict(method=module.method, r=h.r, dtype=h.dtype, precision=precision, batch_size=batch_size,
                 seq_len=seq_len, gradient_checkpointing=h.gradient_checkpointing, optimizer=optimizer,
                 strategy=strategy, devices=devices, attn_implementation=h.attn_implementation or "sdpa")
    return Estimate(**shard(b, strategy, devices), gpu=name, gpu_bytes=cap, setup=setup)
