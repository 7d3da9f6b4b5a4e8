"""The three arms of the attention-routing study: equal parameters, the input layouts, masks that
make padding invisible, where attention may look, and what `exact_match` counts."""

import pytest
import torch

from datamodules.seq2seq import Vocab, collate
from modules.seq2seq.model import ARMS, Seq2Seq, Seq2SeqConfig, decoder_only_layout, exact_match, teacher_forcing

V = Vocab(10)  # BOS 10, EOS 11, PAD 12


def tiny(arm: str, **kw) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(arm=arm, **{"n_layer": 1, "n_head": 2, "n_embd": 16, **kw})).eval()


@pytest.mark.parametrize("n_layer,n_embd", [(2, 64), (3, 96)])
def test_the_arms_have_equal_parameter_counts_within_two_percent(n_layer, n_embd):
    counts = {arm: Seq2Seq(Seq2SeqConfig(arm=arm, n_layer=n_layer, n_embd=n_embd)).num_params() for arm in ARMS}
    assert max(counts.values()) / min(counts.values()) < 1.02, counts
    assert counts["cross"] != counts["pooled"] != counts["decoder-only"]  # three different models, matched


def test_teacher_forcing_shifts_the_target_behind_bos_and_scores_its_eos():
    dec_in, targets = teacher_forcing(torch.tensor([[3, 4, 5], [7, 12, 12]]), torch.tensor([3, 1]), V)
    assert dec_in.tolist() == [[10, 3, 4, 5], [10, 7, 12, 12]]
    assert targets.tolist() == [[3, 4, 5, 11], [7, 11, -1, -1]]


def test_decoder_only_layout_places_bos_between_and_scores_only_the_target():
    src, tgt = torch.tensor([[1, 2, 3], [4, 12, 12]]), torch.tensor([[3, 2, 1], [4, 12, 12]])
    idx, targets = decoder_only_layout(src, torch.tensor([3, 1]), tgt, torch.tensor([3, 1]), V)
    assert idx.tolist() == [[1, 2, 3, 10, 3, 2, 1], [4, 10, 4, 11, 12, 12, 12]]  # the EOS is read, never scored
    assert targets.tolist() == [[-1, -1, -1, 3, 2, 1, 11], [-1, 4, 11, -1, -1, -1, -1]]


@pytest.mark.parametrize("arm", ARMS)
def test_padding_changes_nothing_an_example_is_scored_on(arm):
    model = tiny(arm)
    short = (torch.tensor([5, 1, 4]), torch.tensor([4, 1, 5]))
    long = (torch.tensor([9, 8, 7, 6, 5, 4]), torch.tensor([4, 5, 6, 7, 8, 9]))
    alone = collate([short], V.pad)
    batched = collate([short, long], V.pad)
    la, ta = model(alone["src"], alone["src_len"], alone["tgt"], alone["tgt_len"])
    lb, tb = model(batched["src"], batched["src_len"], batched["tgt"], batched["tgt_len"])
    keep = ta[0] >= 0
    assert torch.equal(tb[0][: keep.numel()][keep], ta[0][keep]) and (tb[0][keep.numel():] < 0).all()
    torch.testing.assert_close(lb[0][: keep.numel()][keep], la[0][keep], rtol=1e-5, atol=1e-5)


def test_the_encoder_sees_the_whole_source_and_the_decoder_only_its_past():
    model = tiny("cross")
    src, n = torch.tensor([[1, 2, 3, 4]]), torch.tensor([4])
    a, _ = model.encode(src, n)
    b, _ = model.encode(torch.tensor([[1, 2, 3, 9]]), n)
    assert not torch.allclose(a[0, 0], b[0, 0])  # bidirectional: position 0 reads position 3
    la, _ = model(src, n, torch.tensor([[4, 3, 2, 1]]), n)
    lb, _ = model(src, n, torch.tensor([[4, 3, 2, 7]]), n)
    torch.testing.assert_close(la[0, :4], lb[0, :4])  # causal: the last target token reaches only the EOS row
    assert not torch.allclose(la[0, 4], lb[0, 4])


@pytest.mark.parametrize("arm", ["cross", "decoder-only"])
def test_source_attention_gives_one_distribution_over_the_source_per_emitting_row(arm):
    model = tiny(arm, n_layer=2)
    maps = model.source_attention(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([5, 4, 3, 2, 1]))
    assert len(maps) == (2 if arm == "cross" else 4) and maps[0].shape == (2, 6, 5)
    if arm == "cross":  # all of cross-attention's mass is on the source
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 6))
    else:  # the decoder-only rows also see BOS and the target so far: less than 1 on the source
        assert (maps[0].sum(-1) < 1).all() and (maps[0] > 0).all()
    with pytest.raises(ValueError, match="pooled arm has no attention"):
        tiny("pooled").source_attention(torch.tensor([1, 2]), torch.tensor([2, 1]))


def test_the_pooled_decoder_sees_the_source_only_through_its_mean():
    model = tiny("pooled")
    n, tgt = torch.tensor([4]), torch.tensor([[1, 2, 3, 4]])
    la, _ = model(torch.tensor([[1, 2, 3, 4]]), n, tgt, n)
    model.encode = lambda src, src_len: (torch.ones(1, 4, 16), torch.zeros(1, 4, dtype=torch.bool))
    lb, _ = model(torch.tensor([[1, 2, 3, 4]]), n, tgt, n)
    lc, _ = model(torch.tensor([[4, 3, 2, 1]]), n, tgt, n)  # another source, same (replaced) summary
    assert not torch.allclose(la, lb) and torch.equal(lb, lc)


def test_exact_match_needs_every_scored_position_right():
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3], [1, 2, 0]]), 5).float()
    targets = torch.tensor([[1, 2, -1], [1, 2, 3]])
    assert exact_match(logits, targets).tolist() == [True, False]


def test_bad_arm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="arm must be one of"):
        Seq2SeqConfig(arm="attention")
    with pytest.raises(ValueError, match="divisible by n_head"):
        Seq2SeqConfig(n_embd=30, n_head=4)
