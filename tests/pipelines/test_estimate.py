"""The memory estimate against the exact ledger of a real step (pipelines/resources.py), and its
closed forms against hand computations. CPU only, no network."""

import pytest
import torch
import transformers

from modules.finetune.model import causal_lm_loss
from modules.gpt.model import GPTConfig
from pipelines import estimate as E
from pipelines.resources import ActivationMeter, grad_bytes, optimizer_bytes, parameter_ledger

# tiny Llama/Mistral shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {"s": (32, 64, 1, 4, 4, 96), "m": (64, 160, 2, 4, 2, 256), "l": (96, 256, 3, 6, 2, 320)}


def hf_config(kind: str, size: str):
    h, i, n, nh, nkv, v = SIZES[size]
    cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
    return cls(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=nh,
               num_key_value_heads=nkv, vocab_size=v, max_position_embeddings=256)


def measure(backbone, vocab: int, batch: int, seq: int, precision: str = "32-true", ckpt: bool = False, **kw):
    """One forward/backward/AdamW step of the real model, ledgered as ResourceMonitor does."""
    torch.manual_seed(0)
    m = E.build(backbone, device="cpu", **kw)
    if precision == "bf16-true":  # what Lightning's bf16-true plugin does to the module
        m = m.to(torch.bfloat16)
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, vocab, (batch, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with ActivationMeter(exclude=list(m.parameters())) as meter, autocast:
        loss, _ = causal_lm_loss(m(input_ids=x, attention_mask=torch.ones_like(x)).logits
                                 if not isinstance(backbone, GPTConfig) else m(input_ids=x), x)
    loss.backward()
    grads = grad_bytes(m)
    opt.step()
    return {"params": parameter_ledger(m)["mem/params_bytes"], "grads": grads,
            "optimizer": optimizer_bytes([opt]), "activations": meter.bytes}


def assert_close(est: E.Estimate, measured: dict, tol: float = 0.05):
    for k, v in measured.items():
        assert getattr(est, k) == pytest.approx(v, rel=tol), (k, getattr(est, k), v)


CASES = [  # (kind, size, method, precision, attention, checkpointing, batch, seq)
    ("llama", "s", "full", "32-true", "sdpa", False, 2, 16),
    ("llama", "m", "lora", "32-true", "sdpa", False, 2, 24),
    ("llama", "l", "full", "bf16-true", "sdpa", False, 1, 32),
    ("llama", "l", "lora", "bf16-mixed", "sdpa", False, 2, 16),
    ("llama", "m", "full", "bf16-mixed", "eager", False, 2, 16),
    ("mistral", "s", "lora", "32-true", "eager", False, 3, 16),
    ("mistral", "m", "full", "32-true", "sdpa", True, 2, 32),
    ("mistral", "l", "lora", "bf16-true", "sdpa", True, 2, 16),
]


@pytest.mark.parametrize("kind,size,method,precision,attn,ckpt,batch,seq", CASES)
def test_llama_and_mistral_match_the_ledger(kind, size, method, precision, attn, ckpt, batch, seq):
    cfg = hf_config(kind, size)
    kw = dict(method=method, r=4, lora_dropout=0.05, dtype="bfloat16" if precision == "bf16-true" else "float32",
              attn_implementation=attn)
    est = E.estimate(cfg, precision=precision, batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt,
                     cuda=False, **kw)
    assert_close(est, measure(cfg, cfg.vocab_size, batch, seq, precision, ckpt, **kw))


@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1)])
def test_minigpt_matches_the_ledger(method, dropout):
    cfg = GPTConfig(vocab_size=80, block_size=32, n_layer=2, n_head=4, n_embd=64)
    kw = dict(method=method, r=4, lora_dropout=dropout)
    est = E.estimate(cfg, batch_size=4, seq_len=32, cuda=False, **kw)
    assert_close(est, measure(cfg, 80, 4, 32, **kw))


def test_checkpointing_keeps_layer_inputs_and_rebuilds_one_layer():
    cfg = hf_config("llama", "l")
    full = E.estimate(cfg, method="full", batch_size=2, seq_len=16, cuda=False)
    ck = E.estimate(cfg, method="full", batch_size=2, seq_len=16, gradient_checkpointing=True, cuda=False)
    per_layer_input = 2 * 16 * 96 * 4
    # without checkpointing the three layers' saves and the head; with it, inputs + the head only
    head = ck.activations - 3 * per_layer_input
    assert full.activations == pytest.approx(head + 3 * ck.recompute, rel=0.02)


def test_nf4_bytes_by_hand():
    # a 4096 x 4096 projection: 8 Mi packed bytes, 262144 blocks of 64 → 262144 uint8 absmax,
    # 1024 fp32 second-level absmax, an fp32 offset and the 16-entry fp32 NF4 code
    n = 4096 * 4096
    assert E.nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 64
    assert E.nf4_bytes(n) / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-5)
    assert E.nf4_bytes(65) == 33 + 2 + 4 + 4 + 64  # odd count and a partial block round up


def test_qlora_quantises_decoder_linears_and_upcasts_the_rest():
    cfg = hf_config("llama", "m")
    est = E.estimate(cfg, method="qlora", r=4, precision="bf16-mixed")
    h, i, n, nh, nkv, v = SIZES["m"]
    hd = h // nh
    linears = [h * nh * hd, h * nkv * hd, h * nkv * hd, nh * hd * h, h * i, h * i, i * h]
    lora = sum(4 * (a + b) for a, b in [(h, nh * hd), (h, nkv * hd), (h, nkv * hd), (nh * hd, h), (h, i), (h, i), (i, h)])
    frozen_fp32 = 4 * (2 * v * h + (2 * n + 1) * h)  # embeddings, lm_head and norms in fp32
    expected = n * sum(E.nf4_bytes(k) for k in linears) + frozen_fp32 + n * lora * 4 + E.QLORA_SHARED_BYTES
    assert est.params == expected
    assert est.grads == n * lora * 4


def test_optimizer_state_by_hand():
    assert E.optimizer_state_bytes(10_000, 4, "adamw") == 2 * 4 * 10_000 + 4
    assert E.optimizer_state_bytes(10_000, 4, "adamw8bit") == 2 * (10_000 + 4 * 40)
    assert E.optimizer_state_bytes(100, 4, "adamw8bit") == 800  # under min_8bit_size: fp32 state
    assert E.optimizer_state_bytes(10_000, 2, "sgd_momentum") == 20_000
    assert E.optimizer_state_bytes(10_000, 4, "sgd") == 0


def test_sharding_and_headroom():
    b = {"params": 800, "grads": 800, "optimizer": 1600, "activations": 100, "recompute": 0}
    assert E.shard(b, "ddp", 8) == b
    assert E.shard(b, "deepspeed_stage_2", 8) == {**b, "grads": 100, "optimizer": 200}
    assert E.shard(b, "fsdp", 8) == {**b, "params": 100, "grads": 100, "optimizer": 200}
    assert E.gpu_bytes("h100") == ("H100-80GB", 80 * 2**30)
    assert E.gpu_bytes("123") == ("GPU", 123.0)


def test_seven_b_parameter_counts_from_shipped_configs():
    # the published sizes: Llama-3-8B 8.03e9 parameters, Mistral-7B 7.24e9
    for name, n in (("llama3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096)):
        est = E.estimate(str(E.ARCH_DIR / name / "config.json"), method="full", dtype="bfloat16",
                         precision="bf16-true", seq_len=8)
        assert est.params == 2 * n


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
    est = E.estimate(hf_config("llama", "s"), method="lora", r=2, batch_size=1, seq_len=8)
    run_id = E.log_estimate(est, tracking_uri=tracking_uri, study="s", variant="lora")
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    df = study_table(client, client.get_run(parent)).summary.set_index("variant")
    assert list(df.index) == ["lora", "lora (estimate)"]
    assert df.loc["lora", "mem/params_bytes"] == 123.0
    assert df.loc["lora (estimate)", "mem/params_bytes"] == est.metrics()["estimate/mem/params_bytes"]
    assert df.loc["lora (estimate)", "mem/grads_bytes"] == est.metrics()["estimate/mem/grads_bytes"] > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(LookupError, match="unknown GPU"):
        E.gpu_bytes("TPU-v9")
    with pytest.raises(ValueError, match="method"):
        E.estimate(hf_config("llama", "s"), method="adapter")
    with pytest.raises(LookupError, match="--arch"):
        E.arch_source("someone/unknown-model-for-test", None)
