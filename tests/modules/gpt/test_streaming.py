"""Streaming with bounded caches, attention sinks and Transformer-XL recurrence (`modules/gpt/streaming.py`,
`recurrence.py`): each cache policy against a written-out reference, the scorer against full forwards."""

import math

import pytest
import torch
import torch.nn.functional as F

from modules.gpt.attention import attention_reference
from modules.gpt.model import GPT, GPTConfig
from modules.gpt.recurrence import xl_forward
from modules.gpt.streaming import (BoundedKVCache, CachePolicy, SinkAttention, add_sink_logits, masked_forward,
                                   policy_mask, stream_score)
from modules.gpt.streaming_module import StreamingGPTModule

W, K, S, M = 6, 2, 5, 4
POLICIES = {
    "dense": CachePolicy("dense"),
    "window": CachePolicy("window", window=W),
    "sinks": CachePolicy("sinks", window=W, sinks=K),
    "segments": CachePolicy("segments", segment=S, memory=M),
}


def reference_visible(kind: str, i: int) -> set[int]:
    """The positions query i sees, written out from each scheme's description."""
    if kind == "dense":
        return set(range(i + 1))
    recent = set(range(max(0, i - W + 1), i + 1))  # the W most recent, itself included
    if kind == "window":
        return recent
    if kind == "sinks":
        return recent | set(range(min(K, i + 1)))  # plus the first K of the stream
    segment_start = i - i % S  # Transformer-XL: the current segment so far and the last M before it
    return set(range(max(0, segment_start - M), i + 1))


def tiny_gpt(pos_emb: str = "rope", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=13, block_size=8, n_layer=2, n_head=4, n_embd=16, pos_emb=pos_emb) | kw
    return GPT(GPTConfig(**cfg)).eval()


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0], tokens[1:], reduction="none")


@pytest.mark.parametrize("kind", list(POLICIES))
def test_each_policy_mask_matches_its_written_out_reference(kind):
    t = 23
    ref = torch.tensor([[j in reference_visible(kind, i) for j in range(t)] for i in range(t)])
    assert torch.equal(policy_mask(POLICIES[kind], t), ref)


@pytest.mark.parametrize("kind", list(POLICIES))
def test_the_cache_holds_exactly_what_the_mask_lets_the_query_see(kind):
    policy, t_max = POLICIES[kind], 23
    cache, mask = BoundedKVCache(policy), policy_mask(policy, t_max)
    for t in range(t_max):
        cache.append(torch.full((1, 1, 1, 2), float(t)), torch.zeros(1, 1, 1, 2), t)
        assert cache.pos.tolist() == mask[t].nonzero().flatten().tolist()
        assert cache.k[0, 0, :, 0].tolist() == [float(p) for p in cache.pos.tolist()]  # keys follow their positions
        if policy.capacity is not None:
            assert len(cache) <= policy.capacity


def test_the_sink_arm_cache_never_exceeds_k_plus_w_on_a_real_stream():
    model, tokens = tiny_gpt(), torch.randint(0, 13, (41,), generator=torch.Generator().manual_seed(1))
    res = stream_score(model, tokens, CachePolicy("sinks", window=8, sinks=4))
    assert res.max_cached == 4 + 8
    per_position = 2 * 2 * 16 * 4  # k, v x 2 layers x 16 channels x fp32
    assert res.cache_bytes.max().item() == (4 + 8) * per_position and res.bytes_slope() == 0
    dense = stream_score(model, tokens, CachePolicy("dense"))
    assert dense.bytes_slope() == per_position and dense.cache_bytes[-1].item() == 40 * per_position


@pytest.mark.parametrize("pos_emb,n_kv_head", [("rope", None), ("alibi", None), ("rope", 2)])
def test_dense_streaming_with_a_cache_equals_the_full_forward(pos_emb, n_kv_head):
    model = tiny_gpt(pos_emb, n_kv_head=n_kv_head)
    tokens = torch.randint(0, 13, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = token_losses(model(tokens[None, :-1])[0], tokens)
    res = stream_score(model, tokens, CachePolicy("dense"))
    torch.testing.assert_close(res.losses, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
@pytest.mark.parametrize("kind", ["window", "segments"])
def test_slot_positions_keep_distances_so_window_and_segments_equal_the_masked_forward(kind, pos_emb):
    model, policy = tiny_gpt(pos_emb), POLICIES[kind]
    tokens = torch.randint(0, 13, (30,), generator=torch.Generator().manual_seed(3))
    ref = token_losses(masked_forward(model, tokens[None, :-1], policy_mask(policy, 29)), tokens)
    torch.testing.assert_close(stream_score(model, tokens, policy).losses, ref, rtol=1e-5, atol=1e-5)


def test_sinks_sit_next_to_the_window_so_far_sinks_differ_from_the_masked_forward():
    """The sinks' slots are 0..k-1, however far back they are: distances change once the window moves on
    (ALiBi shows it plainly: its penalty is linear in the distance)."""
    model, policy = tiny_gpt("alibi"), POLICIES["sinks"]
    tokens = torch.randint(0, 13, (30,), generator=torch.Generator().manual_seed(4))
    ref = token_losses(masked_forward(model, tokens[None, :-1], policy_mask(policy, 29)), tokens)
    res = stream_score(model, tokens, policy)
    torch.testing.assert_close(res.losses[: K + W], ref[: K + W], rtol=1e-5, atol=1e-5)  # nothing evicted yet
    assert (res.losses[K + W + 2 :] - ref[K + W + 2 :]).abs().mean() > 1e-4  # float noise is ~1e-7


def test_recurrence_gives_the_dense_loss_when_the_stream_fits_in_one_segment():
    model = tiny_gpt()
    tokens = torch.randint(0, 13, (9,), generator=torch.Generator().manual_seed(5))  # 8 scored = one segment
    policy = CachePolicy("segments", segment=8, memory=8)
    with torch.no_grad():
        dense = token_losses(model(tokens[None, :-1])[0], tokens)
        xl = token_losses(xl_forward(model, tokens[None, :-1], None, 8)[0], tokens)
    torch.testing.assert_close(stream_score(model, tokens, policy).losses, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", [4, 8, 12])
def test_recurrence_training_over_segments_equals_the_streamed_segments_pattern(memory):
    """xl_forward segment by segment (the training path) == the 'segments' cache token by token."""
    model, s = tiny_gpt(), 8
    tokens = torch.randint(0, 13, (33,), generator=torch.Generator().manual_seed(6))
    mems, logits = None, []
    for i in range(0, 32, s):
        out, mems = xl_forward(model, tokens[None, i : i + s], mems, memory)
        logits.append(out)
        assert all(m.size(1) == min(memory, i + s) and not m.requires_grad for m in mems)
    train_path = token_losses(torch.cat(logits, dim=1), tokens)
    streamed = stream_score(model, tokens, CachePolicy("segments", segment=s, memory=memory)).losses
    torch.testing.assert_close(streamed, train_path.detach(), rtol=1e-5, atol=1e-5)


def test_recurrence_memory_carries_no_gradient_but_its_projections_learn():
    model = tiny_gpt().train()
    tokens = torch.randint(0, 13, (16,), generator=torch.Generator().manual_seed(7))
    _, mems = xl_forward(model, tokens[None, :8], None, 8)
    mems = [m.requires_grad_() for m in mems]  # would collect a gradient if the forward let one through
    out, _ = xl_forward(model, tokens[None, 8:], mems, 8)
    out.sum().backward()
    assert all(m.grad is not None for m in mems)  # the states are inputs of the keys and values...
    model.zero_grad()
    _, plain = xl_forward(model, tokens[None, :8], None, 8)
    assert all(not m.requires_grad for m in plain)  # ...but the memory xl_forward hands on is detached


def test_sink_logit_attention_equals_the_reference_scaled_by_what_the_sink_takes():
    torch.manual_seed(8)
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=4, n_embd=16, pos_emb="rope")
    attn = SinkAttention(cfg).eval()
    attn.sink_logit.data = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    x = torch.randn(2, 7, 16)
    q, k, v = attn.c_attn(x).split([16, 16, 16], dim=2)
    q, k, v = (t.view(2, 7, 4, 4).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (2, 4, 7, 1)
    kept = 1 / (1 + torch.exp(attn.sink_logit.view(1, 4, 1, 1) - lse))  # 1 - the sink's share of the softmax
    ref = (attention_reference(q, k, v) * kept).transpose(1, 2).reshape(2, 7, 16)
    y, _ = attn(x)
    torch.testing.assert_close(y, attn.c_proj(ref), rtol=1e-5, atol=1e-6)


def test_a_learned_sink_model_streams_like_its_forward_and_reports_the_sink_share():
    model = add_sink_logits(tiny_gpt())
    for block in model.transformer.h:
        block.attn.sink_logit.data.fill_(1.5)
    tokens = torch.randint(0, 13, (20,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = token_losses(model(tokens[None, :-1])[0], tokens)
    res = stream_score(model, tokens, CachePolicy("dense"))
    torch.testing.assert_close(res.losses, full, rtol=1e-5, atol=1e-5)
    assert ((res.sink_share > 0) & (res.sink_share < 1)).all()
    assert math.isclose(stream_score(tiny_gpt(), tokens, CachePolicy("dense")).sink_share.abs().max().item(), 0.0,
                        abs_tol=1e-6)


def test_bad_streaming_options_are_named():
    with pytest.raises(ValueError, match="stream_cache must be one of"):
        StreamingGPTModule(stream_cache="ring", pos_emb="rope")
    with pytest.raises(ValueError, match="set xl_memory"):
        StreamingGPTModule(stream_cache="segments", pos_emb="rope")
    with pytest.raises(ValueError, match="pos_emb='rope' or 'alibi'"):
        StreamingGPTModule(stream_cache="window")
    with pytest.raises(ValueError, match="needs window"):
        CachePolicy("window")
    with pytest.raises(ValueError, match="pos_emb='rope' or 'alibi'"):
        stream_score(tiny_gpt("learned"), torch.zeros(5, dtype=torch.long), CachePolicy("dense"))
    for speedrun in ({"qk_norm": True}, {"logit_softcap": 15.0}):  # switches the scorer's own attention lacks
        with pytest.raises(ValueError, match="no QK-norm or logit soft-cap"):
            stream_score(tiny_gpt(**speedrun), torch.zeros(5, dtype=torch.long), CachePolicy("dense"))


@pytest.mark.slow  # the one end-to-end run: ~7 s on a busy machine
def test_a_recurrence_run_streams_its_test_split_through_the_pipeline(tracking_uri):
    """The real entry point: Transformer-XL trained on contiguous segments, then the test split streamed with the
    'segments' cache; the logged bucket loss is recomputed from the tested checkpoint."""
    import mlflow

    from datamodules.shakespeare import ShakespeareDataModule
    from pipelines.run import run_experiment
    from tests.data import shakespeare_text
    from tests.helpers import GPT_CONFIG, gpt_small

    args = gpt_small() + ["--model.class_path=modules.gpt.streaming_module.StreamingGPTModule",
                          "--model.init_args.pos_emb=rope", "--model.init_args.xl_memory=8",
                          "--model.init_args.stream_cache=segments", "--model.init_args.stream_tokens=64",
                          "--model.init_args.stream_buckets=[16, 64]", "--model.init_args.sample_tokens=0",
                          "--data.init_args.train_stream=contiguous", "--data.init_args.test_fraction=0.05"]
    res = run_experiment(GPT_CONFIG, args, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    m = mlflow.MlflowClient(tracking_uri).get_run(res.run_id).data.metrics
    per_position = 2 * 1 * 16 * 4  # k and v, 1 layer, 16 channels, fp32
    assert m["stream/cache_bytes_peak"] == (16 + 8) * per_position  # a segment of 16 and a memory of 8
    assert m["stream/cache_bytes_per_token"] == 0 and m["stream/tokens_per_s"] > 0
    module = StreamingGPTModule.load_from_checkpoint(res.checkpoint, map_location="cpu")
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(shakespeare_text()), max_chars=20000, block_size=16,
                               test_fraction=0.05)
    dm.setup()
    again = stream_score(module.model.eval(), dm.test_data[:65], module.policy())
    assert m["stream/loss_0_16"] == pytest.approx(again.bucket_loss(0, 16), rel=1e-5)
    assert m["stream/loss_16_64"] == pytest.approx(again.bucket_loss(16, 64), rel=1e-5)


def test_recurrence_refuses_a_random_window_stream():
    from datamodules.shakespeare import ShakespeareDataModule
    from tests.data import shakespeare_text
    from tests.helpers import quiet_trainer

    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(shakespeare_text()), max_chars=5000, block_size=8)
    module = StreamingGPTModule(xl_memory=8, pos_emb="rope", n_layer=1, n_head=2, n_embd=8, sample_tokens=0)
    with pytest.raises(ValueError, match="train_stream=contiguous"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
