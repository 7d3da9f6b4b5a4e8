"""The LeNet judge: architecture, size handling, its Lightning module through the real pipeline, and load_judge."""

import mlflow
import pytest
import torch
import torch.nn.functional as F

from modules.classifier.model import LeNet, LeNetConfig, LeNetFeatures
from modules.classifier.module import ClassifierModule, load_judge
from pipelines.run import run_experiment
from tests.helpers import quiet_trainer


@pytest.mark.parametrize("size", [28, 32])
def test_lenet5_parameter_count_and_shapes(size):
    net = LeNet(LeNetConfig(image_size=size))
    # LeNet-5 with 10 outputs: 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706 parameters (LeCun et al. 1998, ReLU variant)
    assert sum(p.numel() for p in net.parameters()) == 61_706
    x = torch.randn(3, 1, size, size)
    assert net(x).shape == (3, 10) and net.features(x).shape == (3, 84)
    assert LeNetFeatures(net)(x).shape == (3, LeNetFeatures(net).num_features)


def test_lenet_scores_28_and_32_pixel_digits_alike():
    torch.manual_seed(0)
    net = LeNet(LeNetConfig(image_size=28)).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(net(F.pad(x, (2, 2, 2, 2), value=-1.0)), net(x))
    net32 = LeNet(LeNetConfig(image_size=32)).eval()
    torch.testing.assert_close(net32(x), net32(F.pad(x, (2, 2, 2, 2), value=-1.0)))


def test_bad_lenet_and_module_arguments():
    with pytest.raises(ValueError, match="image_size"):
        LeNetConfig(image_size=64)
    with pytest.raises(ValueError, match="lr"):
        ClassifierModule(lr=0)
    with pytest.raises(FileNotFoundError, match="lenet_mnist5k.yaml"):
        load_judge("/nonexistent/judge.ckpt")


def test_classifier_learns_through_the_pipeline_and_exports_the_judge(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    judge = tmp_path / "judge.ckpt"
    res = run_experiment(
        "configs/classifier/lenet_mnist5k.yaml",
        [
            "--trainer.max_epochs=2",
            "--trainer.max_steps=80",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--data.init_args.train_limit=1280",
            "--data.init_args.batch_size=32",
            f"--model.init_args.judge_path={judge}",
            "--system_metrics=false",
        ],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    run = mlflow.MlflowClient(uri).get_run(res.run_id)
    m = run.data.metrics
    assert {"train/loss", "val/loss", "val/acc", "test/loss", "test/acc"} <= set(m)
    # 80 steps of 32 digits already separate most classes; chance is 0.1
    assert m["val/acc"] > 0.6 and m["test/acc"] > 0.6
    assert run.data.tags["practicum.project"] == "classifier"
    assert len(run.data.params["data.fingerprint"]) == 64
    # the exported judge is the trained network
    net = load_judge(str(judge))
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    module = ClassifierModule.load_from_checkpoint(judge)
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(net(x), module.eval()(x))


def test_classifier_under_a_plain_trainer(tmp_path):
    from datamodules.mnist import MNISTDataModule

    dm = MNISTDataModule(batch_size=16, train_limit=48)  # 3 steps = one epoch, then validation
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(judge_path=str(tmp_path / "j.ckpt")), datamodule=dm)
    assert (tmp_path / "j.ckpt").is_file() and "val/acc" in trainer.callback_metrics


def test_the_exported_judge_is_the_checkpoint_whose_accuracy_is_reported(tmp_path):
    from datamodules.mnist import MNISTDataModule
    from torchmetrics.functional.classification import multiclass_accuracy

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    judge = tmp_path / "judge.ckpt"
    # "best" = the lowest validation accuracy: surely not the last of two epochs of learning, so the
    # judge written at the end of fit would hold other weights than the tested checkpoint's
    res = run_experiment(
        "configs/classifier/lenet_mnist5k.yaml",
        ["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.init_args.train_limit=320", "--data.init_args.batch_size=32", "--checkpoint_monitor=val/acc",
         "--checkpoint_mode=min", f"--model.init_args.judge_path={judge}", "--system_metrics=false"],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    best, last = (torch.load(p, map_location="cpu", weights_only=True) for p in (res.checkpoint,
                                                                                  res.checkpoint.replace("best", "last")))
    assert (best["epoch"], last["epoch"]) == (0, 1)
    exported = torch.load(judge, map_location="cpu", weights_only=True)
    for k, v in best["state_dict"].items():
        torch.testing.assert_close(exported["state_dict"][k], v)
    # and the reported test accuracy is the exported judge's own, on the test digits
    dm = MNISTDataModule(dataset="mnist5k", val_size=500, test_size=500)  # the config's split
    dm.setup("test")
    x, y = dm._tensors("test").tensors
    acc = multiclass_accuracy(load_judge(str(judge))(x).argmax(-1), y, num_classes=10, average="micro")
    reported = mlflow.MlflowClient(uri).get_run(res.run_id).data.metrics["test/acc"]
    assert float(acc) == pytest.approx(reported, abs=1e-6)
