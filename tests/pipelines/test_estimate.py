"""`practicum estimate`: a run config parsed by the run's parser into the module that trains, the
architecture found offline, and the estimate logged beside a study's measured runs. The estimate's
own arithmetic is tested in tests/modules/finetune/test_memory.py."""

import pytest
import transformers

from modules.finetune.memory import estimate
from modules.finetune.module import FinetuneModule
from pipelines import estimate as E


def test_seven_b_parameter_counts_from_shipped_configs():
    # the published sizes: Llama-3-8B 8.03e9 parameters, Mistral-7B 7.24e9
    for hub_id, name in E.SHIPPED_ARCH.items():
        n = {"llama3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096}[name]
        est = estimate(FinetuneModule(hub_id, "full", dtype="bfloat16"), str(E.ARCH_DIR / name / "config.json"),
                       "bf16-true", seq_len=8)
        assert est.params == 2 * n


def test_config_options_reach_the_estimate():
    """The config's module arguments, parsed against the module's signature, are the estimate's."""
    cfg = str(E.ARCH_DIR.parents[0] / "llama3_8b_lora.yaml")
    base = E.estimate_config(cfg)
    assert base.setup["r"] == 16 and base.setup["batch_size"] == 4 and base.setup["gradient_checkpointing"]
    r32 = E.estimate_config(cfg, ["--model.init_args.r=32"])
    assert r32.grads == 2 * base.grads  # the rank reached the built adapters
    no_ckpt = E.estimate_config(cfg, ["--model.init_args.gradient_checkpointing=false"])
    assert no_ckpt.activations > 5 * base.activations and no_ckpt.recompute == 0


def test_cli_logs_an_estimate_run(tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    cfg = E.ARCH_DIR.parents[0] / "minigpt_lora.yaml"
    assert main(["estimate", str(cfg), "--gpu", "T4", "--tracking_uri", tracking_uri,
                 "--data.init_args.batch_size=2"]) == 0
    assert "T4-16GB" in capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("estimate").experiment_id])[0]
    assert run.data.tags["practicum.role"] == "estimate"
    assert run.data.params["batch_size"] == "2"
    assert {f"estimate/mem/{k}_bytes" for k in ("params", "grads", "optimizer", "activations")} <= set(run.data.metrics)


def test_estimate_joins_a_study_and_compare_shows_it_beside_the_measurement(tracking_uri):
    from mlflow.tracking import MlflowClient

    from pipelines.compare import study_table

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("s")
    cols = '["mem/params_bytes", "mem/grads_bytes"]'
    parent = client.create_run(exp, tags={"practicum.study": "s", "practicum.role": "parent",
                                          "practicum.columns": cols}).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "practicum.role": "variant",
                                         "practicum.variant": "lora"}).info.run_id
    client.log_metric(child, "mem/params_bytes", 123.0)
    client.set_terminated(child)  # the table averages finished runs
    arch = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    vocab_size=96)
    est = estimate(FinetuneModule("practicum-test/tiny", "lora", r=2), arch, seq_len=8)
    run_id = E.log_estimate(est, tracking_uri=tracking_uri, study="s", variant="lora")
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    df = study_table(client, client.get_run(parent)).summary.set_index("variant")
    assert list(df.index) == ["lora", "lora (estimate)"]
    assert df.loc["lora", "mem/params_bytes"] == 123.0
    assert df.loc["lora (estimate)", "mem/params_bytes"] == est.metrics()["estimate/mem/params_bytes"]
    assert df.loc["lora (estimate)", "mem/grads_bytes"] == est.metrics()["estimate/mem/grads_bytes"] > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(LookupError, match="--arch"):
        E.arch_source("someone/unknown-model-for-test", None)
    cfg = str(E.ARCH_DIR.parents[0] / "llama3_8b_lora.yaml")
    with pytest.raises(Exception, match="method must be one of"):
        E.estimate_config(cfg, ["--model.init_args.method=adapterx"])
