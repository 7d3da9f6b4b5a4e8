"""Lightning strategies for real: two DDP processes on CPU (gloo), one MLflow run, disjoint shards."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipelines.run import load_experiment, run_experiment
from pipelines.tracking import ConfigError
from tests.helpers import free_port
from tests.helpers import GPT_RUN as GPT

ROOT = Path(__file__).resolve().parents[2]


def _ddp(cli, cfg: Path, uri: str, rec: Path, *extra: str):
    rec.mkdir()
    cb = [{"class_path": f"tests.pipelines.toy.{name}", "init_args": {"folder": str(rec)}}
          for name in ("RecordBatches", "RecordLedger")]
    r = cli("run", str(cfg), "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
            "--system_metrics=false", f"--tracking_uri={uri}",
            f"--trainer.callbacks={yaml.safe_dump(cb, default_flow_style=True).strip()}", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("MLflow run") == 1  # only rank 0 reports
    return r


def _shards(rec: Path) -> list[set[str]]:
    files = sorted(rec.glob("rank*.txt"))
    assert [f.name for f in files] == ["rank0.txt", "rank1.txt"]
    return [{line.split()[1] for line in f.read_text().splitlines()} for f in files]


def _runs(uri):
    c = MlflowClient(uri)
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


@pytest.mark.slow
def test_gpt_ddp_matches_single_process_with_the_same_global_batch(tmp_path, tracking_uri, practicum_cli):
    cfg = tmp_path / "gpt.yaml"
    cfg.write_text(yaml.safe_dump({**GPT, "trainer": {**GPT["trainer"], "max_steps": 20}}))
    single = run_experiment(cfg, ["--data.init_args.batch_size=16", "--system_metrics=false"], tracking_uri)
    assert single.status == "FINISHED"
    _ddp(practicum_cli, cfg, tracking_uri, tmp_path / "rec", "--data.init_args.batch_size=8")  # 2 ranks x 8 = 16

    runs = _runs(tracking_uri)
    assert len(runs) == 2  # the single run and ONE run for both DDP ranks
    (ddp,) = [r for r in runs if r.info.run_id != single.run_id]
    assert ddp.info.status == "FINISHED"
    rank0, rank1 = _shards(tmp_path / "rec")
    assert len(rank0) == len(rank1) == 20 * 8 and not rank0 & rank1  # disjoint windows

    # Same global batch and seed: the validation curve follows the single-process one.
    # Tolerance 2e-3: all-reduced gradients differ from one big batch only by float summation order.
    c = MlflowClient(tracking_uri)
    a = {m.step: m.value for m in c.get_metric_history(single.run_id, "val/loss")}
    b = {m.step: m.value for m in c.get_metric_history(ddp.info.run_id, "val/loss")}
    assert a.keys() == b.keys() and len(a) == 2
    assert all(abs(a[s] - b[s]) < 2e-3 for s in a), (a, b)
    # the resource ledger is aggregated over the ranks' own ledgers: throughput and the samples and
    # tokens seen are summed, memory and times (a step, a validation pass) are the max
    per_rank = [json.loads((tmp_path / "rec" / f"ledger{r}.json").read_text()) for r in (0, 1)]
    assert per_rank[0].keys() == per_rank[1].keys()
    summed = {"perf/tokens_per_s", "perf/samples_per_s", "budget/samples", "budget/tokens"}
    assert summed <= per_rank[0].keys() and {"mem/host_peak_rss_bytes", "perf/step_time_s"} <= per_rank[0].keys()
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        want = sum(values) if key in summed else max(values)
        assert key in summed or not key.endswith("_per_s"), f"{key} is a throughput: summed over ranks"
        assert ddp.data.metrics[key] == pytest.approx(want, rel=1e-12), (key, values)
    assert per_rank[0]["budget/tokens"] == per_rank[1]["budget/tokens"] == 20 * 8 * GPT["data"]["init_args"]["block_size"]


@pytest.mark.slow
def test_classifier_ddp_one_run_disjoint_shards(tmp_path, tracking_uri, practicum_cli):
    cfg = ROOT / "configs/classifier/lenet_mnist5k.yaml"
    _ddp(practicum_cli, cfg, tracking_uri, tmp_path / "rec", "--trainer.max_epochs=1", "--trainer.limit_train_batches=6",
         "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", f"--model.init_args.judge_path={tmp_path}/j.ckpt")
    (run,) = _runs(tracking_uri)
    assert run.info.status == "FINISHED" and "val/acc" in run.data.metrics
    rank0, rank1 = _shards(tmp_path / "rec")
    assert rank0 and rank1 and not rank0 & rank1  # DistributedSampler split the training set


@pytest.mark.parametrize("preset,match", [("fsdp", "FSDP needs CUDA"), ("deepspeed_stage_2", r"\.\[deepspeed\]"),
                                          ("deepspeed_stage_3", r"\.\[deepspeed\]")])
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-side errors; GPU runs are in benchmarks/gpu_check.sh")
def test_gpu_strategies_give_a_clear_error_on_cpu(preset, match, tracking_uri):
    with pytest.raises(ConfigError, match=match):
        run_experiment(ROOT / "configs/gpt/plays_char_cpu.yaml", ["--config", str(ROOT / f"configs/trainer/{preset}.yaml")],
                       tracking_uri)
    assert _runs(tracking_uri) == []  # refused before a run was opened


def test_fsdp_preset_wraps_transformer_blocks():
    cli = load_experiment(ROOT / "configs/gpt/plays_char_cpu.yaml", ["--config", str(ROOT / "configs/trainer/fsdp.yaml")])
    from modules.gpt.model import Block

    init = cli.config.trainer.strategy.init_args
    assert init.auto_wrap_policy == {Block} and init.activation_checkpointing_policy == {Block}
    assert init.state_dict_type == "sharded"


@pytest.mark.gpu  # FSDP in Lightning needs CUDA
def test_fsdp_single_gpu_run_and_resume(tmp_path, tracking_uri, practicum_cli):
    cfg = tmp_path / "gpt.yaml"
    cfg.write_text(yaml.safe_dump({**GPT, "trainer": {**GPT["trainer"], "accelerator": "gpu", "max_steps": 10}}))
    fsdp = ["--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--trainer.devices=1", "--system_metrics=false"]
    res = run_experiment(cfg, fsdp + ["--checkpoint_every_n_steps=5"], tracking_uri)
    assert res.status == "FINISHED", res.error
    last = Path(tracking_uri.removeprefix("sqlite:///")).parent / "checkpoints" / res.run_id / "last.ckpt"
    assert last.is_dir() and any(last.iterdir())  # sharded: a folder of shards
    more = run_experiment(cfg, fsdp + [f"--resume={res.run_id}", "--trainer.max_steps=15"], tracking_uri)
    assert more.status == "FINISHED" and more.run_id == res.run_id, more.error
    steps = [m.step for m in MlflowClient(tracking_uri).get_metric_history(res.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) >= 14


@pytest.mark.slow
def test_torchrun_launch_gives_one_run(tmp_path, tracking_uri, practicum_cli):
    """Under torchrun every rank starts at once: only rank 0 may open the store (a fresh SQLite schema
    created by two processes collides) and create the run."""
    from tests.pipelines.toy import TOY

    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    (tmp_path / "fresh").mkdir()
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"  # not created yet
    launcher = ("-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}",
                "--master_addr=127.0.0.1")
    r = practicum_cli("run", str(cfg), "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
                      "--system_metrics=false", f"--tracking_uri={uri}", timeout=300, launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
