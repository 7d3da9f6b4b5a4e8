"""The regularisation study's module: equal-size CNN and MLP, per-image shifts, the measured train/test gap."""

import pytest
import torch

from datamodules.mnist import MNISTDataModule
from modules.regularisation.module import RegularisationModule
from tests.helpers import quiet_trainer


def test_cnn_and_mlp_have_about_the_same_parameter_count():
    cnn, mlp = RegularisationModule("cnn"), RegularisationModule("mlp")
    n_cnn, n_mlp = (sum(p.numel() for p in m.parameters()) for m in (cnn, mlp))
    assert (n_cnn, n_mlp) == (61_706, 784 * 78 + 78 + 78 * 10 + 10)
    x = torch.zeros(3, 1, 28, 28)
    assert cnn(x).shape == mlp(x).shape == (3, 10)


def test_shift_moves_each_image_and_fills_with_background():
    torch.manual_seed(0)
    m = RegularisationModule("cnn", max_shift=2)
    x = -torch.ones(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0  # a bright square in the middle
    out = m._shift(x)
    assert out.shape == x.shape and out.min() == -1.0
    rows = (out[:, 0] == 1.0).any(dim=2).float().argmax(dim=1)  # first bright row of each image
    assert set(rows.tolist()) == {8, 9, 10, 11, 12}  # every offset in [-2, 2] occurs, per image
    assert torch.equal(RegularisationModule("cnn", max_shift=0)._shift(x), x)


def test_test_gap_is_train_minus_test_accuracy():
    torch.manual_seed(0)
    dm = MNISTDataModule("mnist5k", batch_size=32, train_limit=64, val_size=50, test_size=100)
    model = RegularisationModule("mlp", width=32)
    trainer = quiet_trainer(max_epochs=6, check_val_every_n_epoch=3)
    trainer.fit(model, dm)
    assert 0 < float(trainer.callback_metrics["train/acc"]) <= 1  # scored at each validation
    out = trainer.test(model, dm, verbose=False)[0]
    assert out["test/gap"] == pytest.approx(out["test/train_acc"] - out["test/acc"], abs=1e-6)
    assert out["test/train_acc"] > out["test/acc"]  # 64 digits, six epochs: memorised faster than learned


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="arch"):
        RegularisationModule("rnn")
    with pytest.raises(ValueError, match="max_shift"):
        RegularisationModule(max_shift=-1)
