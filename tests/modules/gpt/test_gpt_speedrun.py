"""The speedrun's architecture switches (issue 27), each taken the way a user gives it: GPTModule init_args
-> GPTConfig -> GPT. Every test compares against the model without the switch, so a switch that is
dropped on the way fails it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modules.gpt.module import GPTModule

BASE = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32, pos_emb="rope")
IDX = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))


def model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return GPTModule(**{**BASE, **kw}).model.eval()


def logits(m, idx=IDX) -> torch.Tensor:
    with torch.no_grad():
        return m(idx)[0]


def test_zero_init_proj_makes_every_block_the_identity_at_init():
    x = torch.randn(2, 12, 32)
    plain, zero = model(), model(zero_init_proj=True)
    with torch.no_grad():
        for b_plain, b_zero in zip(plain.transformer.h, zero.transformer.h):
            torch.testing.assert_close(b_zero(x)[0], x, rtol=0, atol=0)  # both residual branches add exactly 0
            assert (b_plain(x)[0] - x).abs().max() > 1e-4  # GPT-2's init: they do not
            # the projections are drawn first and then zeroed, so every other weight is the default's
            torch.testing.assert_close(b_zero.attn.c_attn.weight, b_plain.attn.c_attn.weight)
            torch.testing.assert_close(b_zero.mlp.c_fc.weight, b_plain.mlp.c_fc.weight)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """RMS-normalised q and k: scaling W_q and W_k changes nothing; without QK-norm it sharpens attention."""
    for qk_norm, same in ((True, True), (False, False)):
        a = model(qk_norm=qk_norm)
        b = model(qk_norm=qk_norm)
        with torch.no_grad():
            for block in b.transformer.h:
                block.attn.c_attn.weight[: 2 * 32] *= 10.0  # the q and k rows (v untouched)
        diff = (logits(a) - logits(b)).abs().max().item()
        assert (diff < 1e-4) if same else (diff > 1e-3), (qk_norm, diff)


def test_relu2_is_relu_squared_in_the_mlp():
    gelu, relu2 = model(), model(mlp_act="relu2")
    x = torch.randn(5, 32)
    mlp = relu2.transformer.h[0].mlp
    torch.testing.assert_close(mlp.act(mlp.c_fc(x)), F.relu(mlp.c_fc(x)) ** 2)
    assert (logits(gelu) - logits(relu2)).abs().max() > 1e-5  # same weights (same seed), other activation


def test_untied_head_has_weights_of_its_own():
    tied, untied = model(), model(tie_weights=False)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 32 * 32  # one more V x C table
    _, loss = untied(IDX, IDX)
    loss.backward()  # a step on the head leaves the embedding of tokens never seen untouched
    unseen = sorted(set(range(32)) - set(IDX.flatten().tolist()))
    assert untied.transformer.wte.weight.grad[unseen].abs().max() == 0
    assert untied.lm_head.weight.grad[unseen].abs().max() > 0


def test_logit_softcap_bounds_the_logits_and_is_tanh_of_the_uncapped():
    free, capped = model(), model(logit_softcap=2.0)
    with torch.no_grad():
        for m in (free, capped):
            m.lm_head.weight.mul_(100.0)  # logits far beyond the cap
    raw, out = logits(free), logits(capped)
    assert raw.abs().max() > 10 and out.abs().max() <= 2.0  # tanh saturates to the cap in float32
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))


@pytest.mark.parametrize("kw, words", [
    (dict(mlp_act="swish"), "mlp_act"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(optimizer="muon", momentum=1.0), "momentum"),
])
def test_bad_speedrun_options_name_the_field(kw, words):
    with pytest.raises(ValueError, match=words):
        GPTModule(**{**BASE, **kw})


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    m = GPTModule(**BASE, optimizer="muon", tie_weights=False, warmup_steps=2, lr_decay_steps=10)
    opt = m.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in m.model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in m.model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= adamw
    assert not muon & adamw and len(muon | adamw) == len(names)


def test_the_speedrun_preset_switches_every_idea_on_and_the_parity_preset_none():
    """The preset's YAML reaches the model and optimizer; the nanoGPT parity preset (the anchor) keeps GPT-2's."""
    from pathlib import Path

    import yaml

    from modules.optimizers import MuonAdamW

    root = Path(__file__).resolve().parents[3] / "configs" / "gpt"
    built = {}
    for name in ("shakespeare_char_speedrun", "shakespeare_char_cpu"):
        args = yaml.safe_load((root / f"{name}.yaml").read_text())["model"]["init_args"]
        m = GPTModule(vocab_size=65, block_size=64, **args)
        built[name] = (m.model.config, m.configure_optimizers()["optimizer"])
    c, opt = built["shakespeare_char_speedrun"]
    assert (c.pos_emb, c.qk_norm, c.mlp_act, c.zero_init_proj, c.tie_weights, c.logit_softcap) == \
        ("rope", True, "relu2", True, False, 15.0)
    assert isinstance(opt, MuonAdamW)
    c, opt = built["shakespeare_char_cpu"]
    assert (c.pos_emb, c.qk_norm, c.mlp_act, c.zero_init_proj, c.tie_weights, c.logit_softcap) == \
        ("learned", False, "gelu", False, True, None)
    assert type(opt) is torch.optim.AdamW
