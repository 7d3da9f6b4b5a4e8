"""Attention variants through the real pipeline: KV-cache and generation metrics, long-context scores."""

import math

import mlflow
import pytest
import torch
import torch.nn.functional as F

from datamodules.shakespeare import ShakespeareDataModule, consecutive_windows
from modules.gpt.module import GPTModule
from pipelines.run import run_experiment
from tests.data import shakespeare_text
from tests.helpers import GPT_CONFIG as CONFIG
from tests.helpers import gpt_small

TINY, SMALL = shakespeare_text(), gpt_small()

LONG = SMALL + ["--data.init_args.test_fraction=0.05", "--model.init_args.eval_block_sizes=[32]",
                "--model.init_args.sample_tokens=0"]


def test_alibi_mqa_run_logs_cache_and_scores_past_its_training_length(tracking_uri):
    args = LONG + ["--model.init_args.pos_emb=alibi", "--model.init_args.n_kv_head=1"]
    res = run_experiment(CONFIG, args, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    m = mlflow.MlflowClient(tracking_uri).get_run(res.run_id).data.metrics
    # 1 layer, 1 kv head of 16 // 2 = 8 channels, k and v, float32
    assert m["gen/kv_bytes_per_token"] == m["gen/kv_bytes_per_token_formula"] == 2 * 1 * 1 * 8 * 4
    assert m["gen/kv_cache_bytes"] == 16 * m["gen/kv_bytes_per_token"]  # one sequence of block_size 16
    assert m["gen/tokens_per_s"] > 0
    # test/loss_ctx32 recomputed from the tested checkpoint: every token of the 32-token windows
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16,
                               test_fraction=0.05)
    dm.setup()
    model = GPTModule.load_from_checkpoint(res.checkpoint, map_location="cpu").model.eval()
    x, y = consecutive_windows(dm.test_data, 32)
    with torch.no_grad():
        loss = F.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none")  # (N, 32)
    assert m["test/loss_ctx32"] == pytest.approx(loss.mean().item(), rel=1e-5)
    assert m["test/loss_ctx32_tail"] == pytest.approx(loss[:, 16:].mean().item(), rel=1e-5)


def test_learned_positions_say_they_cannot_score_longer_windows(tracking_uri):
    with pytest.warns(UserWarning, match="cannot score 32-token windows"):
        res = run_experiment(CONFIG, LONG, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    m = mlflow.MlflowClient(tracking_uri).get_run(res.run_id).data.metrics
    assert math.isfinite(m["test/loss"]) and math.isnan(m["test/loss_ctx32"])


def test_bad_eval_block_sizes_are_named():
    with pytest.raises(ValueError, match="eval_block_sizes"):
        GPTModule(eval_block_sizes=[0])
