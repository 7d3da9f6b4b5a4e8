"""Each GPTConfig option that should change what the model computes does, taken the way a user gives it:
init_args of GPTModule (the YAML's) -> GPTConfig -> GPT. Two models built with the same weights and one
option changed must differ where the option acts, and agree where it cannot: comparing a model with
itself (SDPA against the reference, cache against no cache) passes even when an option is dropped."""

from __future__ import annotations

import pytest
import torch

from modules.gpt.module import GPTModule

BASE = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32, pos_emb="rope")
T = 12
IDX = torch.randint(0, 32, (2, T), generator=torch.Generator().manual_seed(0))


def model(**kw) -> torch.nn.Module:
    """The GPT inside a GPTModule built from init_args, as a config builds it."""
    torch.manual_seed(0)
    return GPTModule(**{**BASE, **kw}).model.eval()


def share_weights(src: torch.nn.Module, dst: torch.nn.Module) -> torch.nn.Module:
    """dst with src's weights wherever the two have the same tensor (what an option adds stays as built)."""
    theirs = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in theirs and theirs[k].shape == v.shape},
                        strict=False)
    return dst


def logits(m: torch.nn.Module, idx: torch.Tensor = IDX) -> torch.Tensor:
    with torch.no_grad():
        return m(idx)[0]


def test_rope_base_changes_every_position_but_the_first():
    a = model(rope_base=10000.0)
    b = share_weights(a, model(rope_base=100.0))
    la, lb = logits(a), logits(b)
    torch.testing.assert_close(la[:, 0], lb[:, 0])  # position 0 rotates by angle 0 under any base
    assert (la[:, 1:] - lb[:, 1:]).abs().amax(dim=-1).min() > 1e-6


@pytest.mark.parametrize("window", [4, [4, 4], [None, 4]])
def test_sliding_window_changes_only_positions_past_it(window):
    a = model(sliding_window=None)
    b = share_weights(a, model(sliding_window=window))
    la, lb = logits(a), logits(b)
    torch.testing.assert_close(la[:, :4], lb[:, :4])  # the first W positions see everything either way
    assert (la[:, 4:] - lb[:, 4:]).abs().amax(dim=-1).min() > 1e-6


def test_kv_heads_share_keys_and_values_within_each_group():
    """GQA with 2 k/v heads equals multi-head attention whose k/v heads are those 2, each copied to its
    group of query heads (Ainslie et al. 2023): so the option reaches the attention, and groups as stated."""
    gqa = model(n_kv_head=2)
    mha = share_weights(gqa, model(n_kv_head=None))
    hs, C, group = 8, 32, 2
    with torch.no_grad():
        for g_blk, m_blk in zip(gqa.transformer.h, mha.transformer.h):
            w = g_blk.attn.c_attn.weight  # rows: q (C), k (2 hs), v (2 hs)
            assert w.shape[0] == C + 2 * 2 * hs
            q, k, v = w.split([C, 2 * hs, 2 * hs])
            k, v = (t.view(2, hs, C).repeat_interleave(group, dim=0).reshape(4 * hs, C) for t in (k, v))
            m_blk.attn.c_attn.weight.copy_(torch.cat([q, k, v]))
    torch.testing.assert_close(logits(gqa), logits(mha))
    assert (logits(gqa) - logits(model(n_kv_head=None))).abs().max() > 1e-4  # own MHA weights: not the same


def test_norm_changes_the_output():
    a = model(norm="layernorm")
    b = share_weights(a, model(norm="rmsnorm"))
    assert isinstance(b.transformer.ln_f, torch.nn.RMSNorm)
    assert (logits(a) - logits(b)).abs().amax(dim=-1).min() > 1e-6


def test_each_position_scheme_computes_something_else():
    base = model(pos_emb="learned")
    out = {p: logits(share_weights(base, model(pos_emb=p))) for p in ("sinusoidal", "rope", "alibi")}
    out["learned"] = logits(base)
    names = sorted(out)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            assert (out[p] - out[q]).abs().amax(dim=-1)[:, 1:].min() > 1e-6, (p, q)
    # and each knows the order: without positions, one causal attention layer is a set function of the
    # prefix, so the last token's logits would not move when the tokens before it are shuffled (with two
    # layers the mask alone leaks order, through the earlier positions' own prefixes)
    shuffled = torch.cat([IDX[:, :-1].flip(1), IDX[:, -1:]], dim=1)
    for p in names:
        m = model(pos_emb=p, n_layer=1)
        assert (logits(m)[:, -1] - logits(m, shuffled)[:, -1]).abs().max() > 1e-6, p
    # the schemes computed from the position run past block_size; the learned table has no such rows
    long = torch.randint(0, 32, (1, 24))
    for p in ("sinusoidal", "rope", "alibi"):
        assert logits(model(pos_emb=p), long).shape == (1, 24, 32)
    with pytest.raises(ValueError, match="exceeds block_size"):
        logits(base, long)
