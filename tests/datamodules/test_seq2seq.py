"""The generated reversal and sorting tasks: targets, lengths, padding, seeds."""

import pytest
import torch

from datamodules.seq2seq import Seq2SeqTaskDataModule


@pytest.mark.parametrize("task", ["reverse", "sort"])
def test_targets_lengths_and_padded_batches(task):
    dm = Seq2SeqTaskDataModule(task=task, n_symbols=5, train_lengths=(2, 6), test_lengths=(4, 9), n_train=64,
                               n_val=16, n_test_per_length=3, batch_size=8)
    dm.setup()
    for s, t in zip(dm.splits["train"].src, dm.splits["train"].tgt):
        assert 2 <= len(s) <= 6 and s.max() < 5
        assert t.tolist() == (s.tolist()[::-1] if task == "reverse" else sorted(s.tolist()))
    lengths = [len(s) for s in dm.splits["test"].src]
    assert lengths == [n for n in range(4, 10) for _ in range(3)]
    b = next(iter(dm.test_dataloader()))
    assert b["src"].shape == (8, int(b["src_len"].max()))
    pad = torch.arange(b["src"].size(1))[None] >= b["src_len"][:, None]
    assert (b["src"][pad] == dm.vocab.pad).all() and (b["src"][~pad] < 5).all()
    assert torch.equal(b["src_len"], b["tgt_len"])


def test_the_seed_fixes_every_split_and_the_fingerprint():
    def make(seed):
        return Seq2SeqTaskDataModule(n_train=32, n_val=8, n_test_per_length=2, seed=seed)

    assert make(0).fingerprint() == make(0).fingerprint() != make(1).fingerprint()
    a, b = make(0), Seq2SeqTaskDataModule(n_train=64, n_val=8, n_test_per_length=2, seed=0)
    a.setup(), b.setup()
    assert all(torch.equal(x, y) for x, y in zip(a.splits["test"].src, b.splits["test"].src))  # n_train apart


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="task must be one of"):
        Seq2SeqTaskDataModule(task="copy")
    with pytest.raises(ValueError, match="test_lengths must be"):
        Seq2SeqTaskDataModule(test_lengths=(9, 4))
    with pytest.raises(ValueError, match="n_symbols"):
        Seq2SeqTaskDataModule(n_symbols=1)
