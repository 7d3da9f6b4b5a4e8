"""ConditioningModule: the judge per half, and the miniature Stable Diffusion through the real pipeline."""

from pathlib import Path

import mlflow
import pytest
import torch

from modules.classifier.judge import judge_samples
from modules.classifier.model import LeNet, LeNetConfig
from modules.ldm.module import ConditioningModule, judge_halves
from pipelines.run import run_experiment

ROOT = Path(__file__).resolve().parents[3]


def test_each_half_is_judged_against_its_own_token():
    torch.manual_seed(0)
    judge = LeNet(LeNetConfig()).eval()
    left, right = torch.rand(40, 1, 28, 28) * 2 - 1, torch.rand(40, 1, 28, 28) * 2 - 1
    real = torch.rand(30, 1, 28, 56) * 2 - 1
    with torch.no_grad():
        pl, pr = judge(left).argmax(-1), judge(right).argmax(-1)
    prompts = torch.stack([pl, (pr + 1) % 10], dim=1)  # the left token is what the judge reads, the right never
    m = judge_halves(judge, torch.cat([left, right], dim=-1), real, prompts, split="test")
    assert m["test/acc_left"] == 1.0 and m["test/acc_right"] == 0.0 and m["test/acc_both"] == 0.0
    digits = torch.cat(real.split(28, dim=-1))  # the reference: both halves of the real canvases
    assert m["test/fid_right"] == pytest.approx(judge_samples(judge, right, digits)["val/fid"], rel=1e-4)


def test_latent_space_needs_an_autoencoder():
    with pytest.raises(ValueError, match="vae_checkpoint"):
        ConditioningModule(space="latent")


@pytest.mark.slow
def test_miniature_stable_diffusion_through_the_pipeline(tmp_path, tiny_vae_ckpt, judge_ckpt):
    """configs/ldm/canvas_latent.yaml, shrunk: the latents of the tiny VAE, the judge per half, the
    routing score and sampling time are logged, with the sample grid and the attention maps."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = {"vae_checkpoint": tiny_vae_ckpt, "classifier_checkpoint": judge_ckpt, "block_out_channels": "[8, 16]",
             "cross_attention": "[false, true]", "context_dim": 16, "num_timesteps": 50, "num_sample_steps": 2,
             "num_eval_samples": 8, "eval_batch_size": 8, "warmup_steps": 1}
    res = run_experiment(
        str(ROOT / "configs/ldm/canvas_latent.yaml"),
        [f"--model.init_args.{k}={v}" for k, v in model.items()]
        + ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
           "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false", "--data.init_args.batch_size=8", "--data.init_args.num_train=32",
           "--data.init_args.num_val=8", "--data.init_args.num_test=8", "--system_metrics=false"],
        tracking_uri=uri,
    )
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(uri)
    m = client.get_run(res.run_id).data.metrics
    for split in ("val", "test"):
        for key in ("loss", "acc_left", "acc_right", "acc_both", "fid_left", "fid_right", "fid_floor"):
            assert f"{split}/{key}" in m, (split, key, sorted(m))
        assert 0.0 <= m[f"{split}/attn_routing"] <= 1.0
    assert m["perf/sample_time_s"] > 0
    files = {f.path for f in client.list_artifacts(res.run_id, "samples")} | {
        f.path for f in client.list_artifacts(res.run_id, "attention")}
    assert {"samples/final.png", "attention/maps.png"} <= files
