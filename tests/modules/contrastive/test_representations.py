"""The representation encoders, the augmentation, the probe, and every objective through the pipeline."""

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from modules.contrastive.model import RepresentationConfig, RepresentationModel, augment
from modules.contrastive.module import RepresentationModule, balanced_subset, linear_probe
from pipelines.run import run_experiment

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "contrastive" / "simclr_mnist5k.yaml"
TINY = ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--data.init_args.train_limit=512",
        "--data.init_args.batch_size=128", "--trainer.log_every_n_steps=1", "--model.init_args.width=4", "--model.init_args.feature_dim=8",
        "--model.init_args.label_fractions=[0.1, 1.0]", "--system_metrics=false"]


def test_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(1)))
    # with no rotation, zoom, shift or noise it is the identity (the affine grid maps pixels onto themselves)
    same = augment(x, max_degrees=0.0, scale=(1.0, 1.0), max_shift=0.0, noise=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", ["simclr", "autoencoder", "vae", "supervised", "random"])
def test_features_shape_and_vae_reads_the_mean(objective):
    m = RepresentationModel(RepresentationConfig(objective, feature_dim=6, width=4))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    f = m.features(x)
    assert f.shape == (3, 6)
    if objective == "vae":
        mu, _ = m.encoder(x).chunk(2, dim=1)
        torch.testing.assert_close(f, mu)
        assert torch.isfinite(m.vae_loss(x))


def test_balanced_subset_and_probe():
    y = np.repeat(np.arange(4), 50)
    idx = balanced_subset(y, 0.1, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [5, 5, 5, 5]
    assert np.bincount(y[balanced_subset(y, 0.001, np.random.default_rng(0))]).tolist() == [1, 1, 1, 1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) + 4 * np.eye(4)[y][:, :3]  # classes 0-2 separable, class 3 at the origin
    acc = linear_probe(x, y, x, y, [0.1, 1.0], seed=0)
    assert acc[1.0] > 0.9 and 0.25 < acc[0.1] <= 1.0
    noise = linear_probe(rng.normal(size=(200, 3)), y, rng.normal(size=(200, 3)), y, [1.0], seed=0)
    assert noise[1.0] < 0.5  # nothing to read: near chance (0.25)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="objective must be one of"):
        RepresentationModule(objective="byol")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RepresentationModule(temperature=0.0)
    with pytest.raises(ValueError, match=r"label_fractions must be fractions in \(0, 1\]"):
        RepresentationModule(label_fractions=[0.0, 1.0])


def test_pipeline_logs_the_probe_and_the_embedding(tracking_uri):
    res = run_experiment(CONFIG, TINY, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(tracking_uri)
    m = client.get_run(res.run_id).data.metrics
    for split in ("val", "test"):
        for p in ("10", "100"):
            assert 0.1 <= m[f"{split}/probe_acc_{p}pct"] <= 1.0
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["test/loss"])
    files = {a.path for a in client.list_artifacts(res.run_id, "embedding")}
    assert files == {"embedding/tsne.png", "embedding/tsne.json"}


@pytest.mark.parametrize("objective", ["simclr", "autoencoder", "vae", "supervised", "random"])
def test_each_objective_trains_its_encoder_except_random(objective):
    torch.manual_seed(0)
    module = RepresentationModule(objective=objective, width=4, feature_dim=8)
    before = [p.detach().clone() for p in module.model.encoder.parameters()]
    x, y = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (8,))
    opt = module.configure_optimizers()
    loss = module.objective_loss(x, y)
    if objective == "random":
        assert loss is None  # Lightning then skips the step: the floor stays at its initialisation
        return
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in module.model.encoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.encoder.parameters()))
