"""`cross_attention` against torch's nn.MultiheadAttention (kdim/vdim), and self-attention as its
special case: torch's self-attention and the mini-GPT's own CausalSelfAttention."""

import pytest
import torch

from modules.gpt.attention import cross_attention, self_attention
from modules.gpt.model import CausalSelfAttention, GPTConfig


def test_cross_attention_matches_torch_multihead_attention_with_kdim_vdim_and_padding():
    torch.manual_seed(0)
    C, Cm, nh = 16, 12, 4
    mha = torch.nn.MultiheadAttention(C, nh, kdim=Cm, vdim=Cm, bias=True, batch_first=True).eval()
    for p in mha.parameters():  # torch zeros its biases; random ones test that each lands where it should
        torch.nn.init.normal_(p, std=0.3)
    x, memory = torch.randn(3, 5, C), torch.randn(3, 7, Cm)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 6:] = True
    want, want_w = mha(x, memory, memory, key_padding_mask=pad, average_attn_weights=False)
    # torch keeps separate q/k/v projections when kdim != embed_dim; ours stacks k's over v's
    w_kv = torch.cat([mha.k_proj_weight, mha.v_proj_weight])
    b_q, b_kv = mha.in_proj_bias[:C], mha.in_proj_bias[C:]
    got, got_w = cross_attention(x, memory, mha.q_proj_weight, w_kv, mha.out_proj.weight, nh, b_q, b_kv,
                                 mha.out_proj.bias, key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    assert got_w.shape == (3, nh, 5, 7) and got_w[1, :, :, 4:].abs().max() == 0  # no weight on padding


def test_self_attention_is_cross_attention_of_a_sequence_with_itself_as_torch_computes_it():
    torch.manual_seed(1)
    C, nh = 16, 2
    mha = torch.nn.MultiheadAttention(C, nh, bias=True, batch_first=True).eval()
    for p in mha.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, C)
    want, _ = mha(x, x, x, attn_mask=torch.ones(6, 6, dtype=torch.bool).triu(1))  # True: not allowed
    got, _ = self_attention(x, mha.in_proj_weight, mha.out_proj.weight, nh, mha.in_proj_bias, mha.out_proj.bias,
                            causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    C3 = mha.in_proj_weight
    same, _ = cross_attention(x, x, C3[:C], C3[C:], mha.out_proj.weight, nh, mha.in_proj_bias[:C],
                              mha.in_proj_bias[C:], mha.out_proj.bias, causal=True)
    assert torch.equal(got, same)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_the_mini_gpts_causal_self_attention_is_the_special_case(attention):
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=4, n_embd=32, bias=True, attention=attention)
    attn = CausalSelfAttention(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 8, 32)
    want, _ = attn(x)
    got, w = self_attention(x, attn.c_attn.weight, attn.c_proj.weight, 4, attn.c_attn.bias, attn.c_proj.bias,
                            causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert w.triu(1).abs().max() == 0  # causal: nothing on future keys
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 8))


def test_cross_attention_refuses_a_width_the_heads_do_not_divide_and_mismatched_batches():
    w = torch.randn(10, 10)
    with pytest.raises(ValueError, match="divisible by n_head"):
        cross_attention(torch.randn(1, 2, 10), torch.randn(1, 3, 10), w, torch.randn(20, 10), w, 3)
    with pytest.raises(ValueError, match="batch"):
        cross_attention(torch.randn(2, 2, 10), torch.randn(1, 3, 10), w, torch.randn(20, 10), w, 2)
