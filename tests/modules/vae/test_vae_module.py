"""VAEModule: the logged ELBO terms, beta, the traversal, and the real pipeline end to end with the
DDPM's judge; the vae-vs-ddpm study judges both projects alike."""

import mlflow
import numpy as np
import pytest
import scipy.stats
import torch

from datamodules.mnist import MNISTDataModule
from modules.classifier.judge import judge_samples
from modules.vae.module import VAEModule
from pipelines.run import run_experiment
from tests.helpers import quiet_trainer

TINY = dict(hidden_dims=(32,), latent_dim=4, num_eval_samples=40, eval_batch_size=20)


def test_logged_terms_add_up_and_beta_weights_only_the_objective(tmp_path):
    torch.manual_seed(0)
    module = VAEModule(**TINY, beta=4.0)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=2, num_sanity_val_steps=0, default_root_dir=tmp_path,
                            check_val_every_n_epoch=None, val_check_interval=3)
    with pytest.warns(UserWarning, match="classifier_checkpoint is not set"):
        trainer.fit(module, datamodule=MNISTDataModule(batch_size=16, train_limit=48))
    m = {k: v.item() for k, v in trainer.callback_metrics.items()}
    # train/loss is the negative ELBO (beta = 1); what is minimised weights the KL by beta
    assert m["train/loss"] == pytest.approx(m["train/recon"] + m["train/kl"], rel=1e-5)
    assert m["train/objective"] == pytest.approx(m["train/recon"] + 4.0 * m["train/kl"], rel=1e-5)
    assert m["val/loss"] == pytest.approx(m["val/recon"] + m["val/kl"], rel=1e-5)
    assert m["train/kl"] > 0 and "val/fid" not in m
    # the validation loss is the BCE summed per image plus the closed-form KL, at the fixed eval noise
    dm = MNISTDataModule(batch_size=16)
    dm.setup("fit")
    xs = [dm._tensors("val").tensors[0][i * 16 : (i + 1) * 16] for i in range(2)]
    want = []
    for i, x in enumerate(xs):
        recon, kl = module.net.elbo_terms((x + 1) / 2, torch.Generator().manual_seed(module.hparams.eval_seed + i))
        want.append((recon + kl).mean())
    assert m["val/loss"] == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)


def test_traversal_grids():
    torch.manual_seed(0)
    flat = VAEModule(hidden_dims=(16,), latent_dim=2, traversal_steps=5)
    grid, nrow = flat.traversal()
    assert grid.shape == (25, 1, 28, 28) and nrow == 5 and grid.min() >= -1 and grid.max() <= 1
    # one row per latent dimension, the most used (by KL on x) first, the others held at the prior mean
    module = VAEModule(hidden_dims=(16,), latent_dim=6, traversal_steps=4, traversal_dims=3)
    with torch.no_grad():
        module.net.fc_mu.weight.zero_()
        module.net.fc_mu.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 0.0]))  # only dim 4 moves away from N(0, 1)
        module.net.fc_logvar.weight.zero_()
        module.net.fc_logvar.bias.zero_()
    grid, nrow = module.traversal(x=torch.rand(8, 1, 28, 28) * 2 - 1)
    assert grid.shape == (12, 1, 28, 28) and nrow == 4
    z = torch.zeros(4, 6)
    z[:, 4] = torch.from_numpy(scipy.stats.norm.ppf([0.05, 0.35, 0.65, 0.95]))  # N(0, 1) quantiles
    torch.testing.assert_close(grid[:4], module.decode_images(z), atol=1e-5, rtol=0)


def test_pipeline_run_logs_the_elbo_terms_judged_metrics_and_artifacts(tmp_path, judge_ckpt):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_experiment(
        "configs/vae/vae_mnist5k.yaml",
        ["--model.init_args.hidden_dims=[32]", "--model.init_args.latent_dim=2", "--model.init_args.num_eval_samples=40",
         "--model.init_args.eval_batch_size=20", f"--model.init_args.classifier_checkpoint={judge_ckpt}",
         "--trainer.max_epochs=2", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=1",
         "--trainer.log_every_n_steps=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.init_args.batch_size=16", "--data.init_args.train_limit=32", "--system_metrics=false"],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(uri)
    run = client.get_run(res.run_id)
    m = run.data.metrics
    for key in ("train/loss", "train/recon", "train/kl", "train/objective", "val/loss", "val/recon", "val/kl",
                "test/loss", "test/recon", "test/kl", "val/fid", "val/fid_floor", "val/class_coverage",
                "val/classifier_confidence", "test/fid", "test/fid_floor", "test/class_coverage", "test/classifier_confidence"):
        assert key in m and np.isfinite(m[key]), key
    assert len(client.get_metric_history(res.run_id, "val/fid")) == 2  # judged at every validation
    assert run.data.tags["practicum.project"] == "vae"
    arts = {a.path for a in client.list_artifacts(res.run_id, "samples")}
    assert {"samples/final.png", "samples/reconstructions.png", "samples/traversal.png"} <= arts
    # the checkpoint alone rebuilds the model (without the judge), and test/... is the shared judge's
    # verdict on its prior samples, drawn with the test noise, against the first test batch
    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=False)
    assert not any("lenet" in k or "judge" in k for k in ckpt["state_dict"])
    again = VAEModule.load_from_checkpoint(res.checkpoint, map_location="cpu")
    again.setup("test")
    assert again.noise_seed("test") != again.noise_seed("val")
    dm = MNISTDataModule(batch_size=16)
    dm.setup("test")
    want = judge_samples(again.judge, again.sample(40, seed=again.noise_seed("test")), dm._tensors("test").tensors[0][:16],
                         split="test")
    for key in ("test/fid", "test/class_coverage", "test/classifier_confidence"):
        assert m[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the judge first"):
        VAEModule(**TINY, classifier_checkpoint=str(tmp_path / "none.ckpt")).setup("fit")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        VAEModule(beta=-1.0)
    with pytest.raises(ValueError, match="likelihood must be"):
        VAEModule(likelihood="gaussian")
    with pytest.raises(ValueError, match="image_size"):
        VAEModule(**TINY).training_step((torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long)), 0)


def test_vae_vs_ddpm_judges_every_variant_alike():
    """One judge (the study's stage), one sample count, one data split: the FIDs and their floors
    are comparable across the two projects."""
    from pipelines.run import load_experiment
    from pipelines.study import load_study

    study = load_study("configs/studies/vae-vs-ddpm.yaml")
    seen = {}
    for name in study.variants:
        cli = load_experiment(*study.variant_config(name, {"judge": "0" * 32}))
        h, d = cli.model.hparams, cli.datamodule
        seen[name] = (type(cli.model).__name__, h.classifier_checkpoint, h.num_eval_samples,
                      (d.dataset, d.val_size, d.test_size, d.seed))
    assert {s[0] for s in seen.values()} == {"VAEModule", "DiffusionModule"}
    assert len({s[1:] for s in seen.values()}) == 1, seen
    assert next(iter(seen.values()))[1] == "runs:/" + "0" * 32
