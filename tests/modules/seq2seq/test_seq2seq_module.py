"""Seq2SeqModule through the real pipeline (metrics by length bucket, attention maps as artifacts),
the attention-mass probe against hand-made maps, and a mismatched vocabulary refused."""

from pathlib import Path

import mlflow
import pytest
import torch

from datamodules.seq2seq import Seq2SeqTaskDataModule
from modules.seq2seq.module import Seq2SeqModule, copy_mass
from pipelines.run import run_experiment
from tests.helpers import quiet_trainer

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "seq2seq" / "reverse_cross_cpu.yaml"
SMALL = [
    "--model.init_args.n_layer=1", "--model.init_args.n_embd=16", "--model.init_args.n_head=2",
    "--model.init_args.warmup_steps=1", "--model.init_args.length_buckets=[4,6,9]", "--model.init_args.map_lengths=[5]",
    "--data.init_args.train_lengths=[1,5]", "--data.init_args.test_lengths=[4,8]", "--data.init_args.n_train=64",
    "--data.init_args.n_val=16", "--data.init_args.n_test_per_length=4", "--data.init_args.batch_size=16",
    "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=2",
    "--system_metrics=false",
]


def test_pipeline_run_logs_exact_match_by_length_and_attention_maps(tracking_uri):
    res = run_experiment(CONFIG, SMALL, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(tracking_uri)
    m = client.get_run(res.run_id).data.metrics
    buckets = [m["test/exact_match_len4to5"], m["test/exact_match_len6to8"]]
    assert all(0 <= b <= 1 for b in buckets) and m["test/exact_match_drop"] == pytest.approx(buckets[0] - buckets[1])
    # the overall exact match is the bucket mean weighted by strings (2 lengths x 4, then 3 x 4)
    assert m["test/exact_match"] == pytest.approx((2 * buckets[0] + 3 * buckets[1]) / 5, abs=1e-6)
    assert 0 < m["test/attn_copy_mass"] <= 1 and "val/exact_match" in m and m["params/total"] > 0
    files = {a.path for a in client.list_artifacts(res.run_id)} | {a.path for a in client.list_artifacts(res.run_id,
                                                                                                         "attention")}
    assert {"exact_match_by_length.png", "attention/len5.png"} <= files


class Maps(torch.nn.Module):
    """Stands in for a Seq2Seq: source_attention returns the maps it was given."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def source_attention(self, src, tgt):
        return self.maps


def test_copy_mass_is_one_for_the_aligned_head_and_chance_for_a_uniform_one():
    src = torch.tensor([0, 1, 2, 3])
    tgt = src.flip(0)
    aligned = torch.zeros(5, 4)
    aligned[torch.arange(4), torch.tensor([3, 2, 1, 0])] = 1.0  # row i reads source position 3 - i
    aligned[4] = 0.25  # the EOS row is not counted
    uniform = torch.full((5, 4), 0.25)
    assert copy_mass(Maps([torch.stack([uniform, aligned])]), [(src, tgt)]) == pytest.approx(1.0)
    assert copy_mass(Maps([uniform[None]]), [(src, tgt)]) == pytest.approx(0.25)


def test_a_datamodule_of_another_alphabet_is_refused_with_the_fix():
    dm = Seq2SeqTaskDataModule(n_symbols=7, n_train=16, n_val=4, n_test_per_length=1)
    module = Seq2SeqModule(n_symbols=10, n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="set model.init_args.n_symbols"):
        quiet_trainer(max_steps=1).fit(module, datamodule=dm)
