"""The per-layer activation model of the memory estimate: a decoder's training forward written
on the symbolic tape (`modules.finetune.tape`), op by op, for the Llama/Mistral layer of
`transformers` and the mini-GPT's block, with the fine-tuning method's adapter on each layer.

`arch_of` and `layout_of` read what the model needs off the built model itself (the same
`FinetuneModule.build` that trains); `activations` returns the bytes saved for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modules.finetune.model import unwrap
from modules.finetune.tape import Sym, Tape, Weight


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


def arch_of(model: torch.nn.Module) -> Arch:
    core = unwrap(model)
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
    """How the built model holds its weights and its method's trained parts, read off the model
    (`layout_of`). Layers are named by their last two components ("self_attn.q_proj", "mlp.c_proj")."""

    weight_el: int  # bytes per element of the base weights
    embed_el: int  # of embeddings, norms and lm_head (QLoRA upcasts them to fp32)
    trained_base: bool  # full fine-tuning
    input_grad: bool = False  # QLoRA's prepare_model_for_kbit_training makes embedding outputs need grads
    lora: dict[str, int] = field(default_factory=dict)  # wrapped layer → rank
    lora_el: int = 4  # bytes per element of the method's own weights
    lora_dropout: float = 0.0
    dora: bool = False  # LoRA layers carry DoRA's magnitude
    ia3: dict[str, bool] = field(default_factory=dict)  # scaled layer → is it feed-forward (input scaled)
    adapter: dict[str, int] = field(default_factory=dict)  # layer followed by a bottleneck → its width
    prefix: int = 0  # virtual tokens of prefix tuning, prepended to every layer's keys and values


def _layer(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def layout_of(model: torch.nn.Module, precision: str, qlora: bool = False, checkpointing: bool = False) -> Layout:
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    from modules.finetune.adapter import Bottleneck

    lay = Layout(0, 0, False)
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            a = m.lora_A[m.active_adapters[0]]
            lay.lora[_layer(name)] = a.out_features
            p = m.lora_dropout[m.active_adapters[0]]
            lay.lora_dropout, lay.lora_el = getattr(p, "p", 0.0), a.weight.element_size()
            lay.dora = bool(m.use_dora.get(m.active_adapters[0]))
        elif isinstance(m, IA3Layer):
            lay.ia3[_layer(name)] = m.is_feedforward
            lay.lora_el = m.ia3_l[m.active_adapters[0]].element_size()
        elif isinstance(m, Bottleneck):
            lay.adapter[_layer(name)] = m.down.out_features
            lay.lora_el = m.down.weight.element_size()
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.peft_type == "PREFIX_TUNING":
        lay.prefix = config.num_virtual_tokens
        lay.lora_el = model.prompt_encoder[model.active_adapter].embedding.weight.element_size()
    core = unwrap(model)
    emb = core.gpt.transformer.wte.weight if hasattr(core, "gpt") else core.get_input_embeddings().weight
    lay.weight_el = lay.embed_el = emb.element_size()
    lay.trained_base, lay.input_grad = emb.requires_grad, qlora and checkpointing
    if precision == "bf16-true":  # Lightning converts the whole module, adapters included
        lay.weight_el = lay.embed_el = lay.lora_el = 2
    if qlora:
        lay.embed_el = 4  # prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32
        lay.weight_el = 2  # the NF4 weight is dequantised to the compute dtype (bf16) inside each matmul
    return lay


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
        """A base Linear with its method's part (PEFT's LoRA, DoRA, IA3 layers; the bottleneck)."""
        inp, el = x.n // N, lay.lora_el
        if lay.ia3.get(name):  # feed-forward IA3: the input is scaled, x.to(l's dtype) * l
            x = t.to(t.mul(t.to(x, el), Sym(inp, el, True)), x.el)
        y = t.linear(x, W(out, inp))
        if lay.ia3.get(name) is False:  # IA3 on keys and values: the output is scaled
            y = t.to(t.mul(y, Sym(out, el, True)), y.el)
        r = lay.lora.get(name)
        if r:
            xa = t.to(x, el)  # PEFT casts the input to the adapter's dtype (under autocast too)
            xd = t.dropout(xa, lay.lora_dropout)
            lora = t.linear(t.linear(xd, Weight(r, inp, el, True)), Weight(out, r, el, True))
            if lay.dora:  # DoRA (peft.tuners.lora.dora.DoraLinearLayer.forward)
                # B A is made as B(A(I)) for the norm, but only its detached copy is used: that graph
                # (and the identity it saved) is freed before backward, so it is not counted here
                scale = t.mul(Weight(out, 1, el, True), Sym(out, el, False))  # m / ||W + s B A|| (detached)
                # W x again on the dropped input, W cast to the input's (the adapter's) dtype
                base = y if lay.lora_dropout == 0 else t.linear(xd, Weight(out, inp, el, False))
                t.mul(Sym(out, el, True), base)  # (m / ||.|| - 1) * W x
                t.mul(scale, lora)  # m / ||.|| * B A x
            y = Sym(y.n, y.el, True)  # result + scale * B(A x), cast back to the base's dtype: saves nothing
        m = lay.adapter.get(name)
        if m:  # Houlsby's bottleneck on the sublayer output: y + up(silu(down(y)))
            h = t.linear(t.to(y, el), Weight(m, out, el, True))
            t.linear(t.unary(h), Weight(out, m, el, True))
            y = Sym(y.n, y.el, True)
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
        # with a prefix the mask is explicit (queries see the cache): transformers then repeats K/V
        # for grouped heads (enable_gqa only without a mask) and SDPA keeps the mask, made additive
        masked = lay.prefix > 0
        if masked and heads > a.n_kv_head:
            rep = heads // a.n_kv_head
            k, v = Sym(k.n * rep, k.el, k.grad), Sym(v.n * rep, v.el, v.grad)
        if t.mixed:
            q, k, v = t.to(q, 2), t.to(k, 2), t.to(v, 2)
        out = Sym(N * heads * a.head_dim, q.el, q.grad or k.grad or v.grad)
        if out.grad:  # flash / memory-efficient kernels keep q, k, v, out and the fp32 logsumexp
            t.save(q, k, v, out, Sym(B * heads * T, 4, False))
            if masked:
                t.save(Sym(B * T * (T + lay.prefix), q.el, False))
        return out  # laid out (B, T, nh, hs): the transpose-reshape to o_proj is a view

    def eager(t: Tape, q: Sym, k: Sym, v: Sym) -> Sym:  # eager_attention_forward
        nh, rep = a.n_head, a.n_head // a.n_kv_head
        if rep > 1:  # repeat_kv: expand + reshape copies
            k, v = Sym(k.n * rep, k.el, k.grad), Sym(v.n * rep, v.el, v.grad)
        s = t.matmul(q, k, B * nh * T * (T + lay.prefix))
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
        q = lin(t, "self_attn.q_proj", h, a.n_head * a.head_dim)
        k = lin(t, "self_attn.k_proj", h, a.n_kv_head * a.head_dim)
        v = lin(t, "self_attn.v_proj", h, a.n_kv_head * a.head_dim)
        q, k = rope(t, q, cos, sin), rope(t, k, cos, sin)
        if lay.prefix:  # prefix tuning: the cache's trained keys and values go first (a cat saves nothing)
            kv = B * a.n_kv_head * lay.prefix * a.head_dim
            k, v = Sym(k.n + kv, max(k.el, lay.weight_el), True), Sym(v.n + kv, max(v.el, lay.weight_el), True)
        o = sdpa(t, q, k, v, a.n_head) if attn == "sdpa" else eager(t, q, k, v)
        o = lin(t, "self_attn.o_proj", o, C)
        x = Sym(x.n, max(x.el, o.el), x.grad or o.grad)
        h = rmsnorm(t, x)
        g = lin(t, "mlp.gate_proj", h, a.hidden)
        m = t.mul(t.unary(g), lin(t, "mlp.up_proj", h, a.hidden))  # silu keeps its input
        d = lin(t, "mlp.down_proj", m, C)
        return Sym(x.n, max(x.el, d.el), x.grad or d.grad)

    def gpt_block(t: Tape, x: Sym) -> Sym:
        qkv = lin(t, "attn.c_attn", layernorm(t, x), 3 * C)  # q, k, v are views of one storage
        o = sdpa(t, qkv, qkv, qkv, a.n_head)
        x = Sym(x.n, x.el, True)
        o = t.dropout(lin(t, "attn.c_proj", o, C), a.dropout)
        x = Sym(x.n, max(x.el, o.el), x.grad or o.grad)
        f = lin(t, "mlp.c_fc", layernorm(t, x), a.hidden)
        m = t.dropout(lin(t, "mlp.c_proj", t.unary(f), C), a.dropout)  # gelu keeps its input
        return Sym(x.n, max(x.el, m.el), x.grad or m.grad)

    # embeddings: backward of the lookup keeps the ids
    if lay.trained_base:
        tp.save(Sym(N, 8, False))
        if a.kind == "gpt":
            tp.save(Sym(T, 8, False))  # position ids
    if lay.prefix:
        tp.save(Sym(lay.prefix, 8, False))  # the virtual tokens' ids (expanded over the batch: one storage)
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

