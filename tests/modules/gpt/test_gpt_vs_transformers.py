"""The mini-GPT against an independent implementation: Hugging Face's GPT2LMHeadModel.

GPT-2 and the mini-GPT are the same architecture (pre-LayerNorm blocks, learned absolute
positions, fused q/k/v projection, 4C GELU MLP, lm_head tied to the token embedding), with
three differences that GPT2Config/the weight copy have to bridge:

* GPT-2's activation is the tanh approximation of GELU ("gelu_new"); the mini-GPT, like
  nanoGPT, uses the exact erf GELU (nn.GELU()): the reference is configured with "gelu".
* GPT-2 always has biases in its Linear layers and LayerNorms; the mini-GPT's presets have none
  (bias=False): there the reference's biases are set to zero, which is the same function.
* GPT-2 stores its projections as Conv1D, weight (in, out): the copy transposes nn.Linear's
  (out, in) weights.

Also the loss convention differs: the mini-GPT takes targets already shifted by one (nanoGPT)
and ignores -1; GPT2LMHeadModel shifts `labels` itself and ignores -100. The reference gets the
T+1 token sequence, so its first T positions (which see only the mini-GPT's input, causally)
predict exactly the mini-GPT's targets.
"""

import pytest
import torch

from modules.gpt.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

V, T, L, NH, C = 29, 16, 3, 4, 32


def pair(bias: bool, attention: str = "sdpa") -> tuple[GPT, "transformers.GPT2LMHeadModel"]:
    """A trained-looking mini-GPT (random weights, nonzero LayerNorm gains and biases) and a
    GPT2LMHeadModel carrying the same weights."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, block_size=T + 1, n_layer=L, n_head=NH, n_embd=C, bias=bias,
                         attention=attention)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ln" in name:  # LayerNorm gains are 1 and biases 0 at init: make them matter
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
            else:  # weights 5x their init scale: confident, sharply peaked logits and attention
                p.mul_(5.0)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=T + 1, n_embd=C, n_layer=L, n_head=NH, n_inner=None,
        activation_function="gelu",  # exact GELU, as nn.GELU(); GPT-2's default is the tanh form
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, loss_type="ForCausalLM",
    )
    cfg._attn_implementation = "eager"  # the written-out softmax(QK^T/sqrt(d))V, not SDPA
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    src = ours.state_dict()
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            if name.endswith(".attn.bias") or name.endswith(".masked_bias"):
                continue  # causal-mask buffers of older transformers versions
            if name not in src:  # the parameter names are GPT-2's (transformer.h.0.attn.c_attn...)
                assert name.endswith("bias") and not bias, f"no mini-GPT parameter for {name}"
                p.zero_()  # bias=False: a zero bias is no bias
                continue
            w = src[name]
            is_conv1d = any(s in name for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            p.copy_(w.t() if is_conv1d else w)
    assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()  # tied, like ours
    return ours, ref


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_logits_and_loss_equal_gpt2(bias, attention):
    ours, ref = pair(bias, attention)
    torch.manual_seed(1)
    seq = torch.randint(0, V, (3, T + 1))
    x, y = seq[:, :T], seq[:, 1:]
    logits, loss = ours(x, y)
    out = ref(input_ids=seq, labels=seq)
    assert logits.shape == (3, T, V)
    assert logits.abs().max() > 1.0  # not a trivially flat output
    torch.testing.assert_close(logits, out.logits[:, :T], rtol=0, atol=1e-5)
    # HF's loss over T+1 positions predicts seq[:, 1:] from positions 0..T-1: our targets
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=1e-5)


def test_ignored_targets_match_gpt2_ignore_index():
    ours, ref = pair(bias=False)
    torch.manual_seed(2)
    seq = torch.randint(0, V, (2, T + 1))
    targets = seq[:, 1:].clone()
    targets[0, :5] = -1  # mini-GPT / nanoGPT: -1 is ignored
    labels = seq.clone()
    labels[0, 1:6] = -100  # the same targets, in HF's convention (labels shifted inside the model)
    _, loss = ours(seq[:, :T], targets)
    torch.testing.assert_close(loss, ref(input_ids=seq, labels=labels).loss, rtol=0, atol=1e-5)


def test_greedy_generation_with_kv_cache_equals_gpt2():
    ours, ref = pair(bias=True)
    torch.manual_seed(3)
    prompt = torch.randint(0, V, (2, 4))
    mine = ours.generate(prompt, max_new_tokens=T + 1 - 4, temperature=0.0)
    theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=T + 1 - 4,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mine, theirs)


def test_gpt2_default_gelu_differs():
    """The architectures differ in the GELU form: with GPT-2's default "gelu_new" the logits
    move by far more than the tolerance above (so the test above can tell them apart)."""
    ours, ref = pair(bias=True)
    ref.config.activation_function = "gelu_new"
    for block in ref.transformer.h:
        block.mlp.act = transformers.activations.ACT2FN["gelu_new"]
    seq = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(4))
    gap = (ours(seq[:, :T])[0] - ref(input_ids=seq).logits[:, :T]).abs().max().item()
    assert gap > 1e-4
