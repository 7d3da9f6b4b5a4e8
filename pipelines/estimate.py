"""Predict a fine-tune's memory before renting the GPU: `practicum estimate CONFIG`.

The model is built on the meta device exactly as `FinetuneModule` builds it (Hugging Face
`from_config`, or the mini-GPT; PEFT LoRA with its targets), so parameter, gradient and
optimizer bytes are counted from the real parameter list, not from a parameter-count formula.
Activations come from a symbolic forward (`Tape`): each layer is written out op by op in the
shape of the modelling code it mirrors, and each op saves for backward what autograd's
derivative formulas say it saves (torch `tools/autograd/derivatives.yaml`): `mul(a, b)` keeps
`b` when `a` needs a gradient and `a` when `b` does, `mm(x, W)` keeps `x` only when `W` is
trained, and so on. A storage is counted once, like `pipelines.resources.ActivationMeter`, so
the prediction is the ledger's `mem/activations_bytes`; tests/pipelines/test_estimate.py checks
each key against a measured step of tiny Llama, Mistral and mini-GPT models.

Keys are the run ledger's (`mem/params_bytes`, ...) under `estimate/`, so `compare` shows them
beside a measured run; `estimate/mem/recompute_bytes` is one layer's activations, rebuilt in
backward under gradient checkpointing (absent from the ledger, present at the peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GiB = 1024**3
# Memory of common training GPUs (bytes the driver reports, rounded to the marketing figure).
GPUS = {
    "H200-141GB": 141e9, "H100-80GB": 80 * GiB, "A100-80GB": 80 * GiB, "A100-40GB": 40 * GiB,
    "L40S-48GB": 48 * GiB, "A6000-48GB": 48 * GiB, "V100-32GB": 32 * GiB, "RTX5090-32GB": 32 * GiB,
    "L4-24GB": 24 * GiB, "A10G-24GB": 24 * GiB, "RTX4090-24GB": 24 * GiB, "RTX3090-24GB": 24 * GiB,
    "T4-16GB": 16 * GiB, "V100-16GB": 16 * GiB,
}
# Hub ids the presets name → the architecture-only config.json shipped beside them (offline use).
ARCH_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "arch"
SHIPPED_ARCH = {"meta-llama/Meta-Llama-3-8B": "llama3-8b", "mistralai/Mistral-7B-v0.1": "mistral-7b"}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd_momentum")
STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = {"32": "32-true", "32-true": "32-true", "fp32": "32-true", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true"}
KEYS = ("params", "grads", "optimizer", "activations", "recompute")


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


# ---------------------------------------------------------------------------- the symbolic forward


@dataclass(eq=False)
class Sym:
    """A tensor of the symbolic forward: elements, bytes per element, whether autograd tracks it."""

    n: int
    el: int
    grad: bool


@dataclass(eq=False)
class Weight:
    """A parameter (out, inp) of `el` bytes per element; its storage is never an activation."""

    out: int
    inp: int
    el: int
    trained: bool

    @property
    def n(self) -> int:
        return self.out * self.inp


class Tape:
    """What autograd saves for backward, each storage once.

    Args:
        mixed: bf16 autocast (Lightning's bf16-mixed): matmuls run on bf16 copies of their inputs.
        cuda: CUDA kernels (dropout keeps a 1-byte mask, layer norm fp32 statistics); CPU
            dropout keeps its noise tensor in the input's dtype instead.
    """

    def __init__(self, mixed: bool = False, cuda: bool = True):
        self.mixed, self.cuda = mixed, cuda
        self.saved: dict[int, tuple[Sym, int]] = {}  # the Sym is held so its id is never reused

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.saved.values())

    def save(self, *ts: Sym | Weight) -> None:
        for t in ts:
            if isinstance(t, Sym):  # parameters (Weight) are excluded, as in ActivationMeter
                self.saved.setdefault(id(t), (t, t.n * t.el))

    def to(self, x: Sym, el: int) -> Sym:
        return x if x.el == el else Sym(x.n, el, x.grad)  # a cast saves nothing

    def mul(self, a: Sym | Weight, b: Sym | Weight) -> Sym:
        """Elementwise a * b (b may broadcast): each operand is kept for the other's gradient."""
        if a.trained if isinstance(a, Weight) else a.grad:
            self.save(b)
        if b.trained if isinstance(b, Weight) else b.grad:
            self.save(a)
        big = a if a.n >= b.n else b
        return Sym(big.n, max(a.el, b.el), _grad(a) or _grad(b))

    def unary(self, x: Sym, keep_input: bool = True, out_el: int | None = None) -> Sym:
        """silu, gelu, pow: the input is kept (rsqrt, softmax, exp keep their output: `keep_output`)."""
        if x.grad and keep_input:
            self.save(x)
        return Sym(x.n, out_el or x.el, x.grad)

    def keep_output(self, x: Sym, out_el: int | None = None) -> Sym:
        y = Sym(x.n, out_el or x.el, x.grad)
        if x.grad:
            self.save(y)
        return y

    def linear(self, x: Sym, w: Weight) -> Sym:
        """x @ W^T: x is kept for W's gradient, W (or autocast's bf16 copy of it) for x's."""
        if self.mixed:
            x = self.to(x, 2)  # autocast casts the input per call and an fp32 weight to a bf16 copy
            if w.el != 2 and x.grad:  # (cached per forward for a trained leaf; each weight is used once)
                self.save(Sym(w.n, 2, w.trained))
        if w.trained:
            self.save(x)
        return Sym(x.n // w.inp * w.out, max(x.el, w.el) if not self.mixed else 2, x.grad or w.trained)

    def matmul(self, a: Sym, b: Sym, n_out: int) -> Sym:
        """Batched a @ b (eager attention): each operand is kept for the other's gradient."""
        if self.mixed:
            a, b = self.to(a, 2), self.to(b, 2)
        self.mul(a, b)
        return Sym(n_out, a.el, a.grad or b.grad)

    def dropout(self, x: Sym, p: float) -> Sym:
        if p == 0:
            return x  # F.dropout(p=0) returns its input; PEFT uses nn.Identity
        y = Sym(x.n, x.el, x.grad)
        if x.grad:
            self.save(Sym(x.n, 1 if self.cuda else x.el, False))  # the mask (CUDA) or scaled noise (CPU)
        return y


def _grad(t: Sym | Weight) -> bool:
    return t.trained if isinstance(t, Weight) else t.grad


# ---------------------------------------------------------------------------- architectures


@dataclass
class Arch:
    """What the activation model needs of a decoder: Llama/Mistral ("llama") or the mini-GPT ("gpt")."""

    kind: str
    vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden: int  # MLP width
    bias: bool = False
    dropout: float = 0.0  # the mini-GPT's own dropout (attention and residual)


def _core(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def arch_of(model: torch.nn.Module) -> Arch:
    core = _core(model)
    if hasattr(core, "gpt"):  # MiniGPTForCausalLM
        c = core.gpt.config
        if c.attention != "sdpa" or c.ffn != "mlp" or c.dropout:
            # attention dropout inside SDPA changes the kernel (and what it keeps): not modelled
            raise ValueError("the estimate models the mini-GPT with attention='sdpa', ffn='mlp' and dropout=0")
        return Arch("gpt", c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_head, c.head_size, 4 * c.n_embd,
                    c.bias, c.dropout)
    c = core.config
    if c.model_type not in ("llama", "mistral"):
        raise ValueError(f"the activation model covers Llama, Mistral and the mini-GPT, not {c.model_type!r}")
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Arch("llama", c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads, hd, c.intermediate_size, bool(getattr(c, "attention_bias", False)))


@dataclass
class Layout:
    """How the built model holds its weights, read off its parameters (`layout_of`)."""

    weight_el: int  # bytes per element of the base weights
    embed_el: int  # of embeddings, norms and lm_head (QLoRA upcasts them to fp32)
    trained_base: bool  # full fine-tuning
    input_grad: bool = False  # QLoRA's prepare_model_for_kbit_training makes embedding outputs need grads
    lora: dict[str, int] = field(default_factory=dict)  # wrapped module name → rank
    lora_el: int = 4
    lora_dropout: float = 0.0


def layout_of(model: torch.nn.Module, precision: str, qlora: bool = False, checkpointing: bool = False) -> Layout:
    from peft.tuners.lora import LoraLayer

    lora, drop, lora_el = {}, 0.0, 4
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            a = m.lora_A[m.active_adapters[0]]
            lora[name.rsplit(".", 1)[-1]] = a.out_features
            p = m.lora_dropout[m.active_adapters[0]]
            drop, lora_el = getattr(p, "p", 0.0), a.weight.element_size()
    core = _core(model)
    emb = core.gpt.transformer.wte.weight if hasattr(core, "gpt") else core.get_input_embeddings().weight
    w_el = e_el = emb.element_size()
    if precision == "bf16-true":  # Lightning converts the whole module, adapters included
        w_el = e_el = lora_el = 2
    if qlora:
        e_el = 4  # prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32
        w_el = 2  # the NF4 weight is dequantised to the compute dtype (bf16) inside each matmul
    return Layout(w_el, e_el, emb.requires_grad, qlora and checkpointing, lora, lora_el, drop)


def activations(a: Arch, lay: Layout, batch: int, seq: int, precision: str = "32-true",
                checkpointing: bool = False, attn: str = "sdpa", cuda: bool = True) -> tuple[int, int]:
    """(bytes saved for backward, bytes one checkpointed layer rebuilds in backward) of one step.

    The forwards below follow `transformers.models.llama.modeling_llama` (Mistral is the same
    layer; its sliding window changes nothing below the window's length) and
    `modules.gpt.model`, then `modules.finetune.model.causal_lm_loss`.
    """
    mixed = precision == "bf16-mixed"
    tp = Tape(mixed=mixed, cuda=cuda)
    B, T, C, N = batch, seq, a.n_embd, batch * seq

    def W(out: int, inp: int, el: int | None = None) -> Weight:
        return Weight(out, inp, el or lay.weight_el, lay.trained_base)

    def lin(t: Tape, name: str, x: Sym, out: int) -> Sym:
        """Base linear plus PEFT's LoRA branch: x → dropout → A (r × in) → B (out × r), scaled, added."""
        y = t.linear(x, W(out, x.n // N))
        r = lay.lora.get(name)
        if r:
            xa = t.to(x, lay.lora_el)  # PEFT casts the input to the adapter's dtype (under autocast too)
            h = t.linear(t.dropout(xa, lay.lora_dropout), Weight(r, x.n // N, lay.lora_el, True))
            t.linear(h, Weight(out, r, lay.lora_el, True))
            y = Sym(y.n, y.el, True)  # result + scale * B(A x), cast back to the base's dtype: saves nothing
        return y

    def norm_w(n: int) -> Weight:
        return Weight(n, 1, lay.embed_el, lay.trained_base)

    def rmsnorm(t: Tape, x: Sym) -> Sym:  # LlamaRMSNorm: fp32 statistics, weight * x.to(input dtype)
        h = t.to(x, 4)
        t.unary(h)  # pow(2) keeps h
        r = t.keep_output(Sym(N, 4, h.grad))  # rsqrt(mean + eps) keeps its output
        return t.mul(norm_w(C), t.to(t.mul(h, r), x.el))

    def layernorm(t: Tape, x: Sym) -> Sym:  # native_layer_norm keeps input, mean and rstd
        if t.mixed:
            x = t.to(x, 4)  # layer_norm runs in fp32 under autocast
        if x.grad or lay.trained_base:
            stat_el = 4 if t.cuda else x.el
            t.save(x, Sym(N, stat_el, False), Sym(N, stat_el, False))
        return Sym(x.n, x.el, x.grad or lay.trained_base)

    def sdpa(t: Tape, q: Sym, k: Sym, v: Sym, heads: int) -> Sym:
        if t.mixed:
            q, k, v = t.to(q, 2), t.to(k, 2), t.to(v, 2)
        out = Sym(N * heads * a.head_dim, q.el, q.grad or k.grad or v.grad)
        if out.grad:  # flash / memory-efficient kernels keep q, k, v, out and the fp32 logsumexp
            t.save(q, k, v, out, Sym(B * heads * T, 4, False))
        return out  # laid out (B, T, nh, hs): the transpose-reshape to o_proj is a view

    def eager(t: Tape, q: Sym, k: Sym, v: Sym) -> Sym:  # eager_attention_forward
        nh, rep = a.n_head, a.n_head // a.n_kv_head
        if rep > 1:  # repeat_kv: expand + reshape copies
            k, v = Sym(k.n * rep, k.el, k.grad), Sym(v.n * rep, v.el, v.grad)
        s = t.matmul(q, k, B * nh * T * T)
        p = t.keep_output(s, out_el=4)  # softmax(dtype=float32)
        p = t.to(p, q.el if not t.mixed else 2)
        o = t.matmul(p, v, B * nh * T * a.head_dim)
        return Sym(o.n, o.el, o.grad)  # transpose(1, 2).contiguous(): a copy

    def rope(t: Tape, q: Sym, cos: Sym, sin: Sym) -> Sym:
        # q * cos + rotate_half(q) * sin keeps cos and sin: one pair, made once for all layers
        t.mul(q, cos)
        t.mul(Sym(q.n, q.el, q.grad), sin)  # rotate_half(q) is a new tensor
        return Sym(q.n, max(q.el, cos.el), q.grad)

    def llama_block(t: Tape, x: Sym, cos: Sym, sin: Sym) -> Sym:
        h = rmsnorm(t, x)
        q = lin(t, "q_proj", h, a.n_head * a.head_dim)
        k = lin(t, "k_proj", h, a.n_kv_head * a.head_dim)
        v = lin(t, "v_proj", h, a.n_kv_head * a.head_dim)
        q, k = rope(t, q, cos, sin), rope(t, k, cos, sin)
        o = sdpa(t, q, k, v, a.n_head) if attn == "sdpa" else eager(t, q, k, v)
        o = lin(t, "o_proj", o, C)
        x = Sym(x.n, max(x.el, o.el), x.grad or o.grad)
        h = rmsnorm(t, x)
        g = lin(t, "gate_proj", h, a.hidden)
        m = t.mul(t.unary(g), lin(t, "up_proj", h, a.hidden))  # silu keeps its input
        d = lin(t, "down_proj", m, C)
        return Sym(x.n, max(x.el, d.el), x.grad or d.grad)

    def gpt_block(t: Tape, x: Sym) -> Sym:
        qkv = lin(t, "c_attn", layernorm(t, x), 3 * C)  # q, k, v are views of one storage
        o = sdpa(t, qkv, qkv, qkv, a.n_head)
        x = Sym(x.n, x.el, True)
        o = t.dropout(lin(t, "c_proj", o, C), a.dropout)
        x = Sym(x.n, max(x.el, o.el), x.grad or o.grad)
        f = lin(t, "c_fc", layernorm(t, x), a.hidden)
        m = t.dropout(lin(t, "c_proj", t.unary(f), C), a.dropout)  # gelu keeps its input
        return Sym(x.n, max(x.el, m.el), x.grad or m.grad)

    # embeddings: backward of the lookup keeps the ids
    if lay.trained_base:
        tp.save(Sym(N, 8, False))
        if a.kind == "gpt":
            tp.save(Sym(T, 8, False))  # position ids
    x = Sym(N * C, lay.embed_el, lay.trained_base or lay.input_grad)  # the embedding's output
    cos = Sym(T * a.head_dim, lay.embed_el, False)
    sin = Sym(T * a.head_dim, lay.embed_el, False)
    if a.kind == "gpt":
        x = tp.dropout(x, a.dropout)
    recompute = 0
    for _ in range(a.n_layer):
        if checkpointing:  # the layer input is all a checkpointed layer keeps; backward rebuilds the rest
            scratch = Tape(mixed, cuda)
            y = llama_block(scratch, x, cos, sin) if a.kind == "llama" else gpt_block(scratch, x)
            recompute = max(recompute, scratch.bytes)
            tp.save(x)
            x = y
        else:
            x = llama_block(tp, x, cos, sin) if a.kind == "llama" else gpt_block(tp, x)
    x = rmsnorm(tp, x) if a.kind == "llama" else layernorm(tp, x)
    head = Weight(a.vocab, C, lay.embed_el, lay.trained_base)
    logits = tp.linear(x, head)
    # causal_lm_loss: logits[:, :-1] in fp32 → log_softmax keeps its output, nll_loss the targets
    if logits.grad:
        tp.save(Sym(B * (T - 1) * a.vocab, 4, False), Sym(B * (T - 1), 8, False), Sym(1, 4, False))
    return tp.bytes, recompute


# ---------------------------------------------------------------------------- the model, on meta


def build(backbone: Any, method: str = "lora", r: int = 8, lora_alpha: float | None = None,
          lora_dropout: float = 0.05, target_modules: list[str] | str | None = None, dtype: str = "float32",
          attn_implementation: str | None = None, device: str | torch.device = "meta") -> torch.nn.Module:
    """The model `FinetuneModule._build` trains, without its weights: `backbone` is a Hugging Face
    config (or a folder / config.json holding one) or a `GPTConfig`; `device="cpu"` builds it
    for real (the tests measure that one)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    from modules.finetune.backbone import torch_dtype
    from modules.finetune.model import MiniGPTForCausalLM, lora_config
    from modules.gpt.model import GPT, GPTConfig

    dt = torch_dtype("float32" if dtype == "auto" else dtype)
    with torch.device(device):
        if isinstance(backbone, GPTConfig):
            model = MiniGPTForCausalLM(GPT(backbone).to(dt))
        else:
            cfg = backbone if isinstance(backbone, PretrainedConfig) else AutoConfig.from_pretrained(
                str(Path(backbone).parent if str(backbone).endswith(".json") else backbone))
            kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_config(cfg, dtype=dt, **kw)
            model.config.use_cache = False
        if method != "full":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(r, lora_alpha, lora_dropout, target_modules, False,
                                                      minigpt=isinstance(backbone, GPTConfig), task_type="CAUSAL_LM"))
    return model.train()


def parameter_bytes(model: torch.nn.Module, precision: str, optimizer: str, qlora: bool) -> dict[str, int]:
    """Parameter, gradient and optimizer bytes of the built model, each tensor counted once.

    Under QLoRA every Linear of the decoder layers becomes an NF4 `Params4bit` (transformers
    keeps lm_head: `get_keys_to_not_convert`) and every other frozen tensor is upcast to fp32
    (`prepare_model_for_kbit_training`). Gradients take the parameter's dtype."""
    head = _core(model).get_output_embeddings() if qlora else None
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


def estimate(backbone: Any, method: str = "lora", r: int = 8, lora_alpha: float | None = None,
             lora_dropout: float = 0.05, target_modules: list[str] | str | None = None, dtype: str = "float32",
             attn_implementation: str | None = None, precision: str = "32-true", batch_size: int = 1,
             seq_len: int = 512, gradient_checkpointing: bool = False, optimizer: str = "adamw",
             strategy: str = "ddp", devices: int = 1, gpu: str | None = None, cuda: bool = True) -> Estimate:
    """Predict one fine-tuning step's memory per device (see the module docstring)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be full, lora or qlora, got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    precision = PRECISIONS[precision]
    qlora = method == "qlora"
    attn = attn_implementation or "sdpa"
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be sdpa, eager or flash_attention_2, got {attn!r}")
    model = build(backbone, "full" if method == "full" else "lora", r, lora_alpha, lora_dropout, target_modules,
                  "bfloat16" if qlora else dtype, "eager" if attn == "eager" else "sdpa")
    b = parameter_bytes(model, precision, optimizer, qlora)
    lay = layout_of(model, precision, qlora, gradient_checkpointing)
    b["activations"], b["recompute"] = activations(arch_of(model), lay, batch_size, seq_len, precision,
                                                   gradient_checkpointing, "eager" if attn == "eager" else "sdpa", cuda)
    name, cap = gpu_bytes(gpu)
    setup = dict(method=method, r=r, dtype=dtype, precision=precision, batch_size=batch_size, seq_len=seq_len,
                 gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, strategy=strategy,
                 devices=devices, attn_implementation=attn)
    return Estimate(**shard(b, strategy, devices), gpu=name, gpu_bytes=cap, setup=setup)


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
