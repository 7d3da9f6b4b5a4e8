"""The two-digit canvas: each half is a digit of its split, the prompt names both in order."""

import numpy as np
import pytest
import torch

from datamodules.canvas import CanvasDataModule, prompt_text
from datamodules.mnist import MNISTDataModule


def test_canvases_are_two_digits_of_their_split_named_in_order():
    dm = CanvasDataModule(num_train=64, num_val=16, num_test=16, batch_size=8)
    dm.setup()
    mnist = MNISTDataModule()  # the same split of mnist5k
    mnist.setup()
    for split in ("train", "test"):
        canvas, prompt = dm.splits[split]
        assert canvas.shape[1:] == (1, 28, 56) and prompt.shape[1:] == (2,)
        digits = mnist._tensors(split)
        flat = digits.tensors[0].flatten(1)
        for i in range(8):
            for side, half in enumerate(canvas[i].split(28, dim=-1)):
                hits = (flat == half.flatten()).all(1).nonzero().flatten()
                assert len(hits) >= 1  # the half is a digit of this split (so no test digit is trained on)
                assert prompt[i, side] in digits.tensors[1][hits]
    x, p = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 1, 28, 56) and p.dtype == torch.long
    assert prompt_text(torch.tensor([[3, 7]])) == ["3 7"]


def test_test_canvases_do_not_depend_on_the_training_size():
    a, b = CanvasDataModule(num_train=10, num_test=5), CanvasDataModule(num_train=99, num_test=5)
    a.setup(), b.setup()
    assert torch.equal(a.splits["test"][0], b.splits["test"][0])
    assert a.fingerprint() != b.fingerprint()
    assert len(np.unique(a.splits["test"][1].numpy(), axis=0)) >= 4


def test_bad_sizes_say_what_to_fix():
    with pytest.raises(ValueError, match="two digits per canvas"):
        CanvasDataModule(train_limit=1)
    with pytest.raises(ValueError, match="num_train, num_val and num_test must be >= 1"):
        CanvasDataModule(num_test=0)
