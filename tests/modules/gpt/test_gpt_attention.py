"""Attention variants of the mini-GPT: GQA/MQA, sliding windows, RoPE, ALiBi, sinusoidal positions.

Each variant's SDPA path against the written-out reference, the positional schemes against
transformers' implementations, the KV cache against the no-cache path and against its formula.
"""

import pytest
import torch
import torch.nn.functional as F

from modules.gpt.attention import (
    alibi_slopes,
    apply_rope,
    attention_reference,
    attention_sdpa,
    rope_cos_sin,
    sinusoidal_embedding,
)
from modules.gpt.model import GPT, GPTConfig

TINY = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    "mha": {},
    "gqa-2": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window-4": dict(sliding_window=4),
    "window-per-layer": dict(sliding_window=[3, None]),
    "rope": dict(pos_emb="rope", rope_base=500.0),
    "alibi": dict(pos_emb="alibi"),
    "sinusoidal": dict(pos_emb="sinusoidal"),
    "mqa-alibi-window": dict(n_kv_head=1, pos_emb="alibi", sliding_window=5),
    "gqa-rope-window": dict(n_kv_head=2, pos_emb="rope", sliding_window=[None, 6]),
}


def model(attention: str = "sdpa", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, "attention": attention, **kw})).eval()


@pytest.mark.parametrize("n_kv, window, alibi", [
    (4, None, False), (2, None, False), (1, None, False), (4, 3, False), (2, 3, True), (1, None, True), (4, 20, False),
])
@pytest.mark.parametrize("t_q", [7, 1, 3])  # whole sequence, one cached step, a cached chunk
def test_sdpa_attention_equals_reference(n_kv, window, alibi, t_q):
    torch.manual_seed(1)
    q = torch.randn(2, 4, t_q, 8)
    k, v = torch.randn(2, n_kv, 7, 8), torch.randn(2, n_kv, 7, 8)
    slopes = alibi_slopes(4) if alibi else None
    ref = attention_reference(q, k, v, window=window, alibi=slopes)
    assert (attention_sdpa(q, k, v, window=window, alibi=slopes) - ref).abs().max() < 1e-5
    # and the reference is the textbook formula with its heads grouped, masks and bias spelled out
    i = torch.arange(7 - t_q, 7)[:, None]
    j = torch.arange(7)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    for h in range(4):
        kh, vh = k[:, h // (4 // n_kv)], v[:, h // (4 // n_kv)]
        s = q[:, h] @ kh.transpose(-1, -2) / 8**0.5 - (slopes[h] * (i - j) if alibi else 0)
        out = F.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vh
        assert (ref[:, h] - out).abs().max() < 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_model_sdpa_equals_reference_with_and_without_cache(name):
    a, b = model("sdpa", **VARIANTS[name]), model("reference", **VARIANTS[name])
    idx = torch.randint(0, 37, (2, 16))
    full = a(idx)[0]
    assert (full - b(idx)[0]).abs().max() < 1e-5
    # prefill 5 positions, then a chunk of 4 and one step: equal to the full forward at those positions
    _, past_a = a._forward(idx[:, :5])
    _, past_b = b._forward(idx[:, :5])
    chunk_a, past_a = a._forward(idx[:, 5:9], past_a)
    chunk_b, _ = b._forward(idx[:, 5:9], past_b)
    step_a, _ = a._forward(idx[:, 9:10], past_a)
    assert (chunk_a - chunk_b).abs().max() < 1e-5
    assert (chunk_a - full[:, 5:9]).abs().max() < 1e-5
    assert (step_a - full[:, 9:10]).abs().max() < 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_generation_equals_uncached(name):
    m = model(**VARIANTS[name])
    idx = torch.randint(0, 37, (2, 3))
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(5)
        # 3 + 25 tokens > block_size 16: the cache's growth, its rolling window and the cropped context
        runs.append(m.generate(idx, 25, 0.8, 5, use_cache=use_cache, generator=g))
    assert torch.equal(runs[0], runs[1])


def test_gqa_with_as_many_kv_heads_as_heads_is_mha():
    mha, gqa = model(), model(n_kv_head=4)
    assert {k: v.shape for k, v in mha.state_dict().items()} == {k: v.shape for k, v in gqa.state_dict().items()}
    assert all(torch.equal(v, gqa.state_dict()[k]) for k, v in mha.state_dict().items())  # same init draws
    idx = torch.randint(0, 37, (2, 16))
    assert torch.equal(mha(idx)[0], gqa(idx)[0])


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_bytes_match_formula(name):
    m = model(**VARIANTS[name])
    c = m.config
    _, cache = m._forward(torch.randint(0, 37, (3, 16)))
    formula = 2 * c.n_layer * c.kv_heads * c.head_size * 4  # float32
    assert cache.bytes_per_token() == formula == m.kv_bytes_per_token_formula()
    held = [c.window(i) or 16 for i in range(c.n_layer)]  # windowed layers keep their last W positions
    assert cache.nbytes() == 3 * sum(formula // c.n_layer * min(h, 16) for h in held)


def test_mqa_cache_is_a_quarter_of_mha_at_four_heads():
    idx = torch.randint(0, 37, (1, 16))
    mha, gqa, mqa = (model(**VARIANTS[n])._forward(idx)[1].nbytes() for n in ("mha", "gqa-2", "mqa"))
    assert mqa * 4 == mha and gqa * 2 == mha
    # under bf16 the per-token cost halves
    m = model(n_kv_head=1).to(torch.bfloat16)
    assert m._forward(idx)[1].bytes_per_token() == m.kv_bytes_per_token_formula(torch.bfloat16) == 2 * 2 * 1 * 8 * 2


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("window", [4, None])
def test_one_layer_output_has_zero_gradient_outside_the_window(attention, window):
    m = model(attention, n_layer=1, sliding_window=window, pos_emb="rope")
    leaf = {}

    def as_leaf(_mod, _inp, out):  # the token embeddings become the leaf we differentiate against
        leaf["x"] = out.detach().requires_grad_()
        return leaf["x"]

    m.transformer.wte.register_forward_hook(as_leaf)
    t = 12
    logits, _ = m(torch.randint(0, 37, (1, 16)))
    logits[0, t].sum().backward()
    per_pos = leaf["x"].grad[0].abs().sum(-1)  # (T,)
    assert (per_pos[t + 1 :] == 0).all()  # causal
    if window is None:
        assert (per_pos[: t + 1] > 0).all()
    else:
        assert (per_pos[: t - window + 1] == 0).all()  # exactly zero before the window: t-W and earlier
        assert (per_pos[t - window + 1 : t + 1] > 0).all()  # the W positions it sees


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0, max_position_embeddings=64)
    x = torch.randn(2, 4, 10, 16)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(3, 13)[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours = apply_rope(x, *rope_cos_sin(torch.arange(3, 13), 16, 500.0))
    assert (ours - expected).abs().max() < 1e-5
    # relative: rotating q and k by the same offset leaves their dot product unchanged
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dots = [(apply_rope(q, *rope_cos_sin(torch.tensor([p + 5]), 16)) * apply_rope(k, *rope_cos_sin(torch.tensor([p]), 16))).sum()
            for p in (0, 40, 1000)]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-4)


@pytest.mark.parametrize("n_head", [4, 6, 8, 12])
def test_alibi_slopes_match_transformers_bloom(n_head):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bias = build_alibi_tensor(torch.ones(1, 3), n_head, torch.float32)  # (nh, 1, 3): slope * position
    assert torch.allclose(bias[:, 0, 1], alibi_slopes(n_head))


def test_sinusoidal_embedding_is_the_paper_formula():
    pe = sinusoidal_embedding(torch.arange(50), 16)
    pos, i = 37, 3
    angle = torch.tensor(pos / 10000 ** (2 * i / 16))
    assert torch.isclose(pe[pos, 2 * i], angle.sin()) and torch.isclose(pe[pos, 2 * i + 1], angle.cos())


def test_position_free_schemes_run_past_block_size_learned_does_not():
    idx = torch.randint(0, 37, (1, 64))  # 4 x block_size
    for pos_emb in ("rope", "alibi", "sinusoidal"):
        logits, _ = model(pos_emb=pos_emb)(idx)
        assert logits.shape == (1, 64, 37) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="learned position table"):
        model()(idx)


def test_parameter_counts_per_variant():
    C, L, T = 32, 2, 16
    mha = model()
    assert model(pos_emb="rope").num_params(non_embedding=False) == mha.num_params(non_embedding=False) - T * C
    assert model(pos_emb="alibi").num_params() == mha.num_params()  # the non-embedding count is unchanged
    hs = C // 4
    for n_kv in (1, 2):
        saved = L * 2 * C * (4 - n_kv) * hs  # k and v projections of the missing heads
        assert model(n_kv_head=n_kv).num_params() == mha.num_params() - saved
        # the same parameters again when the MLP takes them back: 2C per hidden unit per layer
        equal = model(n_kv_head=n_kv, mlp_hidden=4 * C + saved // (2 * C * L))
        assert equal.num_params() == mha.num_params()


@pytest.mark.parametrize("kw, match", [
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(sliding_window=[4]), "one per layer"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(pos_emb="relative"), "pos_emb"),
    (dict(pos_emb="rope", n_embd=12, n_head=4), "even"),
    (dict(rope_base=1.0), "rope_base"),
    (dict(mlp_hidden=0), "mlp_hidden"),
])
def test_bad_attention_config_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **kw})
