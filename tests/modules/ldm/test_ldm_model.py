"""The prompt-conditioned UNet: variants, prompt routing, guidance by dropping the prompt, recorded cross-attention."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from modules.diffusion.schedule import NoiseSchedule
from modules.ldm.model import (NULL, ConditionalDenoiser, ConditionalDenoiserConfig, parameter_count,
                               recording_cross_attention, token_maps)
from modules.ldm.module import ConditioningModule, routing_score

TINY = dict(block_out_channels=(8, 16), cross_attention=(False, True), context_dim=16)


def _net(conditioning="cross_attention", latent=False, **kw):
    torch.manual_seed(0)
    shape = dict(in_channels=4, height=7, width=14) if latent else {}
    return ConditionalDenoiser(ConditionalDenoiserConfig(conditioning=conditioning, **shape, **{**TINY, **kw})).eval()


def test_variants_have_matched_parameter_counts():
    """The study's three arms at its UNet width: within 2% of one another (the embedding arm's projection
    into the time embedding against the cross-attention arms' position table, and 1 vs 4 channels)."""
    arms = dict(block_out_channels=(16, 32, 32), cross_attention=(False, True, True), context_dim=32)
    counts = [parameter_count(_net("embedding", **arms)), parameter_count(_net(**arms)), parameter_count(_net(latent=True, **arms))]
    assert max(counts) / min(counts) < 1.02, counts


@pytest.mark.parametrize("conditioning", ["cross_attention", "embedding"])
def test_prompt_order_matters_and_none_is_the_null_prompt(conditioning):
    net = _net(conditioning)
    x, t = torch.randn(2, 1, 28, 56), torch.tensor([3, 700])
    prompt = torch.tensor([[3, 7], [1, 2]])
    with torch.no_grad():
        eps = net(x, t, prompt)
        assert eps.shape == x.shape
        assert not torch.allclose(eps, net(x, t, prompt.flip(1)))  # "3 7" is not "7 3"
        torch.testing.assert_close(net(x, t), net(x, t, torch.full_like(prompt, NULL)))


def test_bad_prompts_get_clear_errors():
    net = _net()
    x, t = torch.randn(1, 1, 28, 56), torch.tensor([3])
    with pytest.raises(ValueError, match=r"prompt must be \(B, 2\)"):
        net(x, t, torch.tensor([[3, 7, 1]]))
    with pytest.raises(ValueError, match="classes 0..9 or NULL=10"):
        net(x, t, torch.tensor([[3, 11]]))


def test_guidance_with_the_prompt_dropped_equals_unconditional_sampling():
    """Sampling with guidance w = 3 for dropped prompts (NULL tokens, through the 2B-batch guidance
    arithmetic) gives the canvases of unconditional sampling, bit for bit up to float error; a real
    prompt gives others."""
    torch.manual_seed(0)
    module = ConditioningModule(space="pixel", num_timesteps=50, num_sample_steps=3, guidance_scale=3.0,
                                eval_batch_size=4, **TINY)
    net = module.ema.module.eval()
    null = torch.full((3, 2), NULL)
    guided = module.sample(null, seed=7)
    g = torch.Generator().manual_seed(7)
    x, _ = module.schedule.sample(lambda x, t: net(x, t, None), (3, 1, 28, 56), "ddim", 3, generator=g)
    torch.testing.assert_close(guided, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.sample(None, n=3, seed=7), guided, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(module.sample(torch.tensor([[3, 7]] * 3), seed=7), guided, atol=1e-3)


def test_guidance_combination():
    net = _net()
    x, t, p = torch.randn(2, 1, 28, 56), torch.tensor([5, 40]), torch.tensor([[3, 7], [0, 9]])
    with torch.no_grad():
        eps_p, eps_null = net(x, t, p), net(x, t)
        torch.testing.assert_close(net.guided(x, t, p, 1.0), eps_p, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net.guided(x, t, p, 3.0), eps_null + 3.0 * (eps_p - eps_null), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent", [False, True])
def test_recorded_cross_attention_leaves_the_output_as_diffusers_computes_it(latent):
    net = _net(latent=latent)
    c = net.config
    x, t, p = torch.randn(2, c.in_channels, c.height, c.width), torch.tensor([5, 400]), torch.tensor([[3, 7], [0, 9]])
    with torch.no_grad():
        net.unet.set_attn_processor(AttnProcessor())  # diffusers' plain reference processor
        reference = net(x, t, p)
        with recording_cross_attention(net) as rec:
            out = net(x, t, p)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    blocks = sum(1 for n in net.unet.attn_processors if n.endswith("attn2.processor"))
    assert len(rec.maps) == blocks  # one map per cross-attention layer
    for m in rec.maps:
        assert m.shape[0] == 2 and m.shape[2] == 2
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))  # a softmax over the two tokens
    maps = token_maps(rec.maps, c.height, c.width)
    assert maps.shape == (2, 2, c.height, c.width)
    with torch.no_grad():  # the recorders are gone afterwards
        torch.testing.assert_close(net(x, t, p), reference, atol=1e-5, rtol=1e-5)


def test_embedding_arm_cross_attends_to_one_token_whose_weight_is_one():
    """The trap of issue 29: softmax over a single key is 1 at every position, so this arm's cross-attention
    carries no prompt; the prompt enters through the time embedding only."""
    net = _net("embedding")
    with torch.no_grad(), recording_cross_attention(net) as rec:
        net(torch.randn(2, 1, 28, 56), torch.tensor([5, 400]), torch.tensor([[3, 7], [0, 9]]))
    for m in rec.maps:
        assert m.shape[-1] == 1
        torch.testing.assert_close(m, torch.ones_like(m))


def test_routing_score():
    maps = torch.zeros(1, 2, 4, 8)
    maps[:, 0, :, :4] = maps[:, 1, :, 4:] = 1.0  # each half reads its own token
    assert routing_score(maps) == 1.0
    assert routing_score(maps.flip(1)) == 0.0
    assert routing_score(torch.full((1, 2, 4, 8), 0.5)) == 0.5
