import pytest
import torch


@pytest.fixture(scope="session")
def judge_ckpt(tmp_path_factory):
    """A LeNet judge checkpoint made the way the real one is (ClassifierModule, judge_path), trained briefly:
    the judge of the DDPM's and the VAE's tests."""
    from datamodules.mnist import MNISTDataModule
    from modules.classifier.module import ClassifierModule
    from tests.helpers import quiet_trainer

    path = tmp_path_factory.mktemp("judge") / "lenet.ckpt"
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=30, limit_val_batches=0, default_root_dir=path.parent)
    trainer.fit(ClassifierModule(judge_path=str(path)), datamodule=MNISTDataModule(batch_size=64, train_limit=1920))
    return str(path)
