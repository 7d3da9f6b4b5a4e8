"""The UNet, EMA, guidance, judge metrics, and DiffusionModule through the real pipeline on tiny sizes."""

from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import scipy.linalg
import torch

from datamodules.mnist import MNISTDataModule
from modules.classifier.module import ClassifierModule
from modules.diffusion.model import Denoiser, DiffusionConfig
from modules.diffusion.module import DiffusionModule, ema_with_warmup, image_grid
from modules.training import cosine_lr
from pipelines.run import load_experiment, run_experiment
from tests.helpers import quiet_trainer

TINY = dict(block_out_channels=(8, 16), attention=(False, True), num_timesteps=50, num_sample_steps=4,
            num_eval_samples=40, eval_batch_size=20, warmup_steps=1)


def _plain_trainer(tmp_path, steps=2):
    return quiet_trainer(max_steps=steps, limit_val_batches=2, num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=steps, default_root_dir=tmp_path)


def test_unet_shapes_parameter_counts_and_conditioning():
    torch.manual_seed(0)
    cpu = Denoiser(DiffusionConfig(block_out_channels=(16, 32, 64), attention=(False, False, False)))
    assert sum(p.numel() for p in cpu.parameters()) == 637_169  # the CPU preset's UNet
    uncond = Denoiser(DiffusionConfig(block_out_channels=(16, 32, 64), attention=(False, False, False), num_classes=0))
    # the only difference is the label embedding: (10 labels + null) x time-embedding width (4 x 16)
    assert sum(p.numel() for p in cpu.parameters()) - sum(p.numel() for p in uncond.parameters()) == 11 * 64
    net = Denoiser(DiffusionConfig(image_size=32, block_out_channels=(8, 16, 16), attention=(False, True, False)))
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 10, 999])
    y = torch.tensor([1, 2, 3])
    assert net(x, t, y).shape == x.shape
    assert not torch.allclose(net(x, t, y), net(x, t, torch.tensor([4, 5, 6])))  # labels matter
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((3,), net.null_label)))  # None = null label


def test_classifier_free_guidance_combination():
    torch.manual_seed(0)
    net = Denoiser(DiffusionConfig(block_out_channels=(8, 16), attention=(False, False)))
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 40]), torch.tensor([3, 7])
    eps_y, eps_null = net(x, t, y), net(x, t)
    torch.testing.assert_close(net.guided(x, t, y, 1.0), eps_y)
    torch.testing.assert_close(net.guided(x, t, y, 0.0), eps_null)
    torch.testing.assert_close(net.guided(x, t, y, 3.0), eps_null + 3.0 * (eps_y - eps_null), atol=1e-5, rtol=1e-5)


def test_ema_with_warmup_matches_the_formula():
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    ema_with_warmup(0.999)(ema, p, torch.tensor(0))
    torch.testing.assert_close(ema[0], torch.full((3,), 0.9))  # d = min(0.999, 1/10) = 0.1
    ema_with_warmup(0.5)(ema, p, torch.tensor(1000))
    torch.testing.assert_close(ema[0], torch.full((3,), 0.95))  # d capped at 0.5


def test_image_grid_layout():
    x = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    g = image_grid(x, nrow=2, pad=1)
    assert g.shape == (7, 7) and g.dtype == np.uint8
    assert g[1, 1] == 0 and g[1, 4] == 128 and g[4, 1] == 255 and g[4, 4] == 255  # 4th cell is empty (white)


def test_judge_fid_agrees_with_a_scipy_reference(judge_ckpt):
    module = DiffusionModule(**TINY, classifier_checkpoint=judge_ckpt)
    module.setup("fit")
    dm = MNISTDataModule()
    dm.setup("fit")
    real = dm._tensors("val").tensors[0][:300]
    other = dm._tensors("train").tensors[0][:300]
    fake = torch.rand(300, 1, 28, 28) * 2 - 1
    m = module.judge_metrics(fake, real, reference=other)

    def fid(a, b):
        with torch.no_grad():
            fa, fb = module.judge.features(a).double().numpy(), module.judge.features(b).double().numpy()
        mu, cov = fa.mean(0) - fb.mean(0), np.cov(fa, rowvar=False) @ np.cov(fb, rowvar=False)
        return mu @ mu + np.trace(np.cov(fa, rowvar=False) + np.cov(fb, rowvar=False)) - 2 * np.trace(scipy.linalg.sqrtm(cov).real)

    assert m["val/fid"] == pytest.approx(fid(real, fake), rel=1e-3)
    assert m["val/fid_floor"] == pytest.approx(fid(real, other), rel=1e-3)
    assert m["val/fid_floor"] < m["val/fid"]  # noise is further from digits than other digits are
    assert 0.1 <= m["val/class_coverage"] <= 1.0 and 0.1 <= m["val/classifier_confidence"] <= 1.0
    # real digits are spread over the classes by an (even barely) trained judge
    real_m = module.judge_metrics(real, real)
    assert real_m["val/class_coverage"] >= 0.8 and real_m["val/fid"] == pytest.approx(0.0, abs=1e-3)


def test_training_updates_the_ema_and_logs_without_a_judge(tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(**TINY)
    init = [p.detach().clone() for p in module.net.parameters()]
    trainer = _plain_trainer(tmp_path, steps=3)
    with pytest.warns(UserWarning, match="classifier_checkpoint is not set"):
        trainer.fit(module, datamodule=MNISTDataModule(batch_size=8, train_limit=64))
    assert "val/loss" in trainer.callback_metrics and "val/fid" not in trainer.callback_metrics
    ema_p = list(module.ema.module.parameters())
    net_p = list(module.net.parameters())
    assert int(module.ema.n_averaged) == 3
    assert not torch.allclose(ema_p[0], net_p[0]) and not torch.allclose(ema_p[0], init[0])
    x, snaps = module.sample(6, keep=3)
    assert x.shape == (6, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert snaps[0][0] == 36 and snaps[-1][0] == -1  # DDIM leading spacing over T = 50, then x_0


def test_pipeline_run_logs_judged_metrics_and_artifacts(tmp_path, judge_ckpt):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {"block_out_channels": "[8, 16]", "attention": "[false, true]", "num_timesteps": 50,
                 "num_sample_steps": 4, "num_eval_samples": 40, "eval_batch_size": 20, "classifier_checkpoint": judge_ckpt,
                 "select_guidance": "null", "select_sample_steps": "null"}  # the preset's selection: its own test
    res = run_experiment(
        "configs/diffusion/ddpm_mnist_cpu.yaml",
        [f"--model.init_args.{k}={v}" for k, v in overrides.items()]
        + ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
           "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--data.init_args.batch_size=16", "--data.init_args.train_limit=64", "--system_metrics=false"],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(uri)
    run = client.get_run(res.run_id)
    m = run.data.metrics
    for key in ("train/loss", "val/loss", "test/loss", "val/fid", "val/fid_floor", "val/class_coverage",
                "val/classifier_confidence", "diffusion/label_accuracy"):
        assert key in m and np.isfinite(m[key]), key
    assert m["val/fid"] >= 0 and 0 < m["val/class_coverage"] <= 1 and 0 < m["val/classifier_confidence"] <= 1
    # the same judged metrics against the test digits, for a study to report what it did not select on
    for key in ("test/fid", "test/fid_floor", "test/class_coverage", "test/classifier_confidence", "test/label_accuracy"):
        assert key in m and np.isfinite(m[key]), key
    assert run.data.tags["practicum.project"] == "diffusion"
    arts = {a.path for a in client.list_artifacts(res.run_id)} | {a.path for a in client.list_artifacts(res.run_id, "samples")}
    assert {"loss_curve.png", "samples/final.png", "samples/denoising_strip.png", "samples/step_0000002.png"} <= arts
    # a checkpoint alone rebuilds the model (the judge is not part of it) and samples
    ckpt = torch.load(res.checkpoint, map_location="cpu", weights_only=False)
    assert not any("judge" in k or "lenet" in k for k in ckpt["state_dict"])
    again = DiffusionModule.load_from_checkpoint(res.checkpoint, map_location="cpu")
    assert again.sample(2)[0].shape == (2, 1, 28, 28)
    # test/... is the tested checkpoint's 40 samples, drawn with noise validation never saw, judged
    # against the first test batch (limit_test_batches=1, batch_size=16), not the validation digits
    again.setup("test")
    assert again.noise_seed("test") != again.noise_seed("val")
    dm = MNISTDataModule(batch_size=16)
    dm.setup("test")
    fake, _ = again.sample(40, seed=again.noise_seed("test"))
    want = again.judge_metrics(fake, dm._tensors("test").tensors[0][:16], labels=torch.arange(40) % 10, split="test")
    for key in ("test/fid", "test/class_coverage", "test/classifier_confidence", "test/label_accuracy"):
        assert m[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def test_missing_judge_and_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the judge first"):
        DiffusionModule(**TINY, classifier_checkpoint=str(tmp_path / "none.ckpt")).setup("fit")
    with pytest.raises(ValueError, match="cond_drop_prob"):
        DiffusionModule(**TINY, cond_drop_prob=0.0, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_sample_steps"):
        DiffusionModule(**{**TINY, "num_sample_steps": 51})
    with pytest.raises(ValueError, match="divisible"):
        DiffusionModule(**{**TINY, "block_out_channels": (8, 16, 16, 16), "attention": (False,) * 4})
    with pytest.raises(ValueError, match="one bool per level"):
        DiffusionModule(**{**TINY, "attention": (False,)})
    module = DiffusionModule(**TINY)
    with pytest.raises(ValueError, match="pad_to_32"):
        module.training_step((torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long)), 0)


ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ["configs/diffusion/ddpm_mnist_cpu.yaml", "configs/diffusion/ddpm_mnist.yaml", "configs/diffusion/ddpm_mnist_fast.yaml",
           "configs/classifier/lenet_mnist5k.yaml", "configs/classifier/lenet_mnist.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_parses_and_instantiates(path):
    """Through the project's CLI (the pipeline's parser and links), as `practicum run` reads them."""
    cli = load_experiment(ROOT / path, ["--trainer.accelerator=cpu", "--trainer.precision=32"])
    assert isinstance(cli.model, (DiffusionModule, ClassifierModule))
    assert isinstance(cli.datamodule, MNISTDataModule)
    if isinstance(cli.model, DiffusionModule):
        assert cli.model.config.image_size == cli.datamodule.image_size


def test_quick_study_variants_resolve():
    from pipelines.study import load_study

    study = load_study(ROOT / "configs/studies/ddpm-quick.yaml")
    for name in study.variants:
        cli = load_experiment(*study.variant_config(name))
        assert cli.model.hparams.schedule == name and cli.model.hparams.classifier_checkpoint is None


def test_guidance_and_steps_are_selected_on_validation_and_only_then_tested(tmp_path, judge_ckpt):
    """select_guidance x select_sample_steps: the pair with the lowest FID against the validation digits
    is chosen before testing; test/... is then judged once, at that pair."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {"block_out_channels": "[8, 16]", "attention": "[false, true]", "num_timesteps": 50,
                 "num_sample_steps": 4, "num_eval_samples": 20, "eval_batch_size": 20, "classifier_checkpoint": judge_ckpt,
                 "select_guidance": "[0.0, 3.0]", "select_sample_steps": "[2, 5]"}
    res = run_experiment(
        "configs/diffusion/ddpm_mnist_cpu.yaml",
        [f"--model.init_args.{k}={v}" for k, v in overrides.items()]
        + ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
           "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--data.init_args.batch_size=16", "--data.init_args.train_limit=64", "--system_metrics=false"],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(uri)
    m = client.get_run(res.run_id).data.metrics
    rows = [line.split(",") for line in Path(client.download_artifacts(res.run_id, "selection.csv")).read_text().split()[1:]]
    grid = {(float(w), int(k)): float(f) for w, k, f in rows}
    assert set(grid) == {(0.0, 2), (0.0, 5), (3.0, 2), (3.0, 5)}
    best = min(grid, key=grid.get)
    assert (m["select/guidance_scale"], m["select/num_sample_steps"]) == (best[0], best[1])
    assert m["select/val_fid"] == pytest.approx(grid[best])
    # the test split is judged at the chosen pair, with the test noise
    again = DiffusionModule.load_from_checkpoint(res.checkpoint, map_location="cpu", classifier_checkpoint=judge_ckpt)
    again.setup("test")
    again.hparams.guidance_scale, again.hparams.num_sample_steps = best
    dm = MNISTDataModule(batch_size=16)
    dm.setup("test")
    fake, _ = again.sample(20, seed=again.noise_seed("test"))
    want = again.judge_metrics(fake, dm._tensors("test").tensors[0][:16], labels=torch.arange(20) % 10, split="test")
    assert m["test/fid"] == pytest.approx(want["test/fid"], rel=1e-4)


def test_selection_arguments_are_checked():
    with pytest.raises(ValueError, match="select_sample_steps must lie in"):
        DiffusionModule(num_timesteps=50, num_sample_steps=4, select_sample_steps=[2, 80])
    with pytest.raises(ValueError, match="select_guidance other than 1 needs an unconditional model"):
        DiffusionModule(cond_drop_prob=0.0, guidance_scale=1.0, select_guidance=[1.0, 2.0])


def test_recipe_switches_reach_the_loss_through_the_config():
    """prediction=v with min-SNR: the module's loss is the min-SNR-weighted MSE on v, recomputed by hand
    from the same draws; the defaults keep L_simple."""
    x0, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 3])
    for kw in ({}, {"prediction": "v", "loss_weighting": "min_snr", "snr_gamma": 2.0}):
        torch.manual_seed(0)
        module = DiffusionModule(**TINY, **kw)
        loss = module._loss(x0, y, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        t = torch.randint(0, 50, (4,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        s = module.schedule
        abar = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = module.net(xt, t, y)
        if not kw:
            want = ((out - eps) ** 2).mean()
        else:
            v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
            snr = (abar / (1 - abar)).flatten()
            want = (((out - v) ** 2).flatten(1).mean(1) * snr.clamp(max=2.0) / (snr + 1)).mean()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_v_prediction_samples_through_eps(sampler):
    """A v-network that is exact for a one-image data set (v = sqrt(abar) eps - sqrt(1-abar) x*) must land
    on x* through module.sample, whichever sampler: the module converts v to eps for the sampler."""
    module = DiffusionModule(**{**TINY, "num_classes": 0, "guidance_scale": 1.0}, prediction="v", sampler=sampler)
    module.schedule.clip_denoised = False
    x_star = torch.linspace(-0.9, 0.9, 28 * 28).view(1, 1, 28, 28)

    def v_oracle(x, t, y, w):
        abar = module.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x_star) / (1 - abar).sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x_star

    module.ema.module.guided = v_oracle
    x, _ = module.sample(3)
    torch.testing.assert_close(x, x_star.expand(3, 1, 28, 28), atol=1e-3, rtol=0)


def test_cosine_lr_schedule_decays_to_its_floor_over_the_run(tmp_path):
    module = DiffusionModule(**{**TINY, "warmup_steps": 1, "num_eval_samples": 0}, lr=0.01, lr_schedule="cosine",
                             min_lr_ratio=0.2)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, callbacks=[Record()], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="classifier_checkpoint is not set"):
        trainer.fit(module, datamodule=MNISTDataModule(batch_size=4, train_limit=32))
    want = [cosine_lr(s, 0.01, 0.002, 1, 5) for s in range(5)]  # warm-up 1 step, then cosine to 0.2 * lr at step 5
    assert seen == pytest.approx(want) and seen[1] == pytest.approx(0.01) and seen[-1] > 0.002
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.002)


def test_recipe_arguments_are_checked():
    for kw, match in [({"prediction": "x0"}, "prediction must be"), ({"loss_weighting": "snr"}, "loss_weighting must be"),
                      ({"loss_weighting": "min_snr", "snr_gamma": 0.0}, "snr_gamma must be > 0"),
                      ({"lr_schedule": "step"}, "lr_schedule must be"), ({"min_lr_ratio": 1.5}, "min_lr_ratio must be"),
                      ({"sampler": "dpm", "num_sample_steps": 51}, "num_sample_steps")]:
        with pytest.raises(ValueError, match=match):
            DiffusionModule(**{**TINY, **kw})


def test_recipe_study_variants_resolve():
    """ddpm-recipe: each variant removes one idea of the new preset (and only that one); the old recipe
    differs from the new in those ideas and samples at its own preset's guidance and steps, on the same
    UNet, data and steps; every run samples at one fixed setting, no selection grid."""
    from pipelines.study import load_study

    study = load_study(ROOT / "configs/studies/ddpm-recipe.yaml")
    clis = {name: load_experiment(*study.variant_config(name)) for name in study.variants}
    hp = {name: dict(cli.model.hparams) for name, cli in clis.items()}
    new = hp["new"]
    ideas = {"no-v": "prediction", "no-min-snr": "loss_weighting", "no-cosine": "lr_schedule", "no-dpm": "sampler",
             "no-ema": "ema_decay"}
    for name, removed in ideas.items():
        assert {k for k in new if hp[name][k] != new[k]} == {removed}, name
    assert {k for k in new if hp["old"][k] != new[k]} == set(ideas.values()) - {"ema_decay"} | {"guidance_scale",
                                                                                              "num_sample_steps"}
    assert (hp["old"]["guidance_scale"], hp["old"]["num_sample_steps"]) == (3.0, 10)  # ddpm_mnist_cpu.yaml's own
    assert (new["guidance_scale"], new["num_sample_steps"]) == (2.0, 20)
    assert all(h["select_guidance"] is None and h["select_sample_steps"] is None for h in hp.values())
