"""FinetuneModule on a tiny Llama loaded through `from_pretrained`: what LoRA trains and stores,
that the base stays frozen bit for bit, that the merged export equals base + adapter, and the
errors (QLoRA without CUDA, bad arguments)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from datamodules.instruct import InstructDataModule
from modules.finetune.load import load_for_generation
from modules.finetune.module import FinetuneModule
from tests.helpers import quiet_trainer


class TensorLedger(L.Callback):
    """Bytes of gradients (just before the optimizer step) and of optimizer state, from the tensors."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grad_bytes = sum(p.grad.nbytes for p in pl_module.parameters() if p.grad is not None)

    def on_train_end(self, trainer, pl_module):
        states = trainer.optimizers[0].state.values()
        self.optimizer_bytes = sum(t.nbytes for s in states for t in s.values() if torch.is_tensor(t))


def fit(module, tmp_path, steps=3):
    dm = InstructDataModule(source="python-docs", mode="text", max_length=32, batch_size=4, max_records=8)
    ledger = TensorLedger()
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=2, val_check_interval=steps, callbacks=[ledger], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return trainer, ledger, dm


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """LoRA and full fine-tuning of the same tiny Llama on the same data and steps."""
    tmp = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    lora = FinetuneModule(
        backbone=str(tiny_llama_dir), method="lora", r=4, lora_dropout=0.0, lr=1e-2, export_dir=str(tmp / "export"),
    )
    lora.configure_model()  # built here to snapshot the base; fit's own call must keep this model
    built = lora.backbone
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    lora_trainer, lora_ledger, dm = fit(lora, tmp / "lora")
    assert lora.backbone is built
    full = FinetuneModule(backbone=str(tiny_llama_dir), method="full", export=False)
    full_trainer, full_ledger, _ = fit(full, tmp / "full")
    return dict(lora=lora, full=full, lora_ledger=lora_ledger, full_ledger=full_ledger, frozen=frozen_before,
                lora_trainer=lora_trainer, dm=dm, export=tmp / "export")


def test_lora_trains_under_5_percent(trained):
    lora, full = trained["lora"], trained["full"]
    n_total = sum(p.numel() for p in full.parameters())
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == n_total
    assert 0 < n_lora < 0.05 * n_total
    metrics = trained["lora_trainer"].callback_metrics
    assert metrics["params/trainable"] == n_lora
    assert metrics["params/trainable_pct"] == pytest.approx(100 * n_lora / sum(p.numel() for p in lora.parameters()))


def test_lora_grad_and_optimizer_bytes_under_5_percent_of_full(trained):
    lo, fu = trained["lora_ledger"], trained["full_ledger"]
    full_params_bytes = sum(p.nbytes for p in trained["full"].parameters())
    assert fu.grad_bytes == full_params_bytes  # full fine-tuning: one fp32 gradient per weight
    assert fu.optimizer_bytes >= 2 * full_params_bytes  # AdamW: exp_avg and exp_avg_sq
    ratio = (lo.grad_bytes + lo.optimizer_bytes) / (fu.grad_bytes + fu.optimizer_bytes)
    assert 0 < ratio < 0.05, ratio


def test_frozen_base_is_bit_identical_after_lora_training(trained):
    lora, frozen = trained["lora"], trained["frozen"]
    after = dict(lora.named_parameters())
    assert len(frozen) > 0
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    # and training did move the adapters: LoRA's B starts at zero
    lora_b = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)


def test_val_loss_before_and_after_are_logged(trained):
    m = trained["lora_trainer"].callback_metrics
    assert {"val/loss_before", "val/ppl_before", "val/loss", "val/ppl"} <= set(m)
    assert float(m["val/ppl"]) == pytest.approx(float(torch.exp(m["val/loss"])), rel=1e-5)
    assert float(m["val/loss"]) < float(m["val/loss_before"])  # lr 1e-2 on a random model: it learns


def test_merged_and_adapter_exports_equal_base_plus_adapter(trained, tiny_llama_dir):
    lora, export = trained["lora"], trained["export"]
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    assert (export / "merged" / "model.safetensors").is_file()
    metrics = trained["lora_trainer"].callback_metrics
    assert 0 < metrics["disk/adapter_bytes"] < 0.05 * metrics["disk/full_checkpoint_bytes"]
    x = next(iter(trained["dm"].val_dataloader()))["input_ids"][:2]
    lora.eval()
    with torch.no_grad():
        ours = lora(x)
        base = FinetuneModule(backbone=str(tiny_llama_dir), method="full", export=False)
        base.configure_model()
        base = base.eval()(x)
        merged = load_for_generation(export / "merged")
        adapter = load_for_generation(export / "adapter")
        assert merged.method == "full" and not any("lora" in n for n, _ in merged.named_parameters())
        assert (ours - base).abs().max() > 1e-3  # the adapter changes the model...
        torch.testing.assert_close(merged(x), ours, atol=1e-4, rtol=0)  # ...and merging keeps it
        torch.testing.assert_close(adapter(x), ours, atol=1e-4, rtol=0)
    text = merged.generate_text("The assert statement", max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    assert text.startswith("The assert statement")
    assert text == merged.generate_text("The assert statement", max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    # the pipeline's `practicum generate` finds the loader through practicum.json
    from pipelines.generate import load_generator

    assert json.loads((export / "adapter" / "practicum.json").read_text())["loader"].endswith("load_for_generation")
    assert load_generator(str(export / "adapter")).generate_text("x = 1", 4, seed=0).startswith("x = 1")


def test_lora_checkpoint_keeps_only_adapters_and_round_trips(trained, tmp_path):
    lora, trainer = trained["lora"], trained["lora_trainer"]
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    restored = load_for_generation(path)
    x = torch.randint(0, 300, (1, 10))
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), lora(x), atol=1e-6, rtol=0)


def test_qlora_without_cuda_fails_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # construction stays offline and CUDA-free (`practicum estimate` builds QLoRA configs on any
    # machine); the first hook a Trainer calls, before data or weights, refuses
    module = FinetuneModule(backbone="some/model", method="qlora")
    with pytest.raises(RuntimeError, match="qlora.*CUDA GPU"):
        module.prepare_data()
    with pytest.raises(RuntimeError, match="qlora.*CUDA GPU"):
        module.configure_model()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="lorax"), ValueError, "method must be one of"),
        (dict(method="lora", lr=-1.0), ValueError, "lr must be > 0"),
        (dict(method="lora", dtype="float8"), ValueError, "dtype must be one of"),
        (dict(method="full", use_dora=True), ValueError, "use_dora"),
        (dict(method="lora", backbone="/does/not/exist.ckpt"), FileNotFoundError, "does not exist"),
        # a hub id is only a name at construction, so these reach the LoRA checks without loading
        (dict(method="lora", backbone="some/model", r=0), ValueError, "rank r must be >= 1"),
        (dict(method="lora", backbone="some/model", lora_dropout=1.0), ValueError, "lora_dropout"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FinetuneModule(**{"backbone": "/does/not/exist.ckpt", **kwargs})


@pytest.mark.gpu  # QLoRA needs CUDA
def test_qlora_runs_and_peaks_below_lora_on_gpu(tiny_llama_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    peaks = {}
    for method in ("lora", "qlora"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        module = FinetuneModule(backbone=str(tiny_llama_dir), method=method, r=4, dtype="bfloat16", export=False)
        dm = InstructDataModule(source="python-docs", mode="text", max_length=32, batch_size=4, max_records=8)
        L.Trainer(max_steps=3, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                  limit_val_batches=1, default_root_dir=tmp_path).fit(module, datamodule=dm)
        peaks[method] = torch.cuda.max_memory_allocated()
        del module
    assert peaks["qlora"] < peaks["lora"], peaks


def test_construction_only_checks_arguments(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise AssertionError("construction must not load anything")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    hub = FinetuneModule(backbone="HuggingFaceTB/SmolLM2-135M", method="lora")
    assert (hub.kind, hub.source, hub.backbone) == ("hf", "HuggingFaceTB/SmolLM2-135M", None)
    unset = FinetuneModule()  # parses (a study sets the backbone), but cannot run
    with pytest.raises(ValueError, match="has no backbone.*runs:/<run id>"):
        unset.prepare_data()
    with pytest.raises(ValueError, match="names an MLflow run"):
        FinetuneModule(backbone="runs:/" + "0" * 32)  # only the pipeline fetches runs
    with pytest.raises(ValueError, match="dtype='auto' is for Hugging Face"):
        FinetuneModule(dtype="auto")
    with pytest.raises(RuntimeError, match="configure_model"):
        unset(torch.zeros(1, 4, dtype=torch.long))


def test_minigpt_backbone_is_built_by_the_trainer_hooks(tmp_path, tiny_minigpt_ckpt):
    """The data module takes the module's tokenizer in setup, configure_model builds the model,
    all inside fit."""
    module = FinetuneModule(backbone=tiny_minigpt_ckpt, r=2, export=False)
    trainer, _, dm = fit(module, tmp_path, steps=2)
    assert dm.tokenizer is module.tokenizer
    assert 0 < module.n_trainable < module.n_total and module.lr == pytest.approx(2e-3)
    assert "val/loss" in trainer.callback_metrics
    # the data/model length check runs once the model exists (Lightning's setup hooks come first)
    too_long = InstructDataModule(source="python-docs", mode="text", max_length=64, batch_size=4, max_records=8)
    again = FinetuneModule(backbone=tiny_minigpt_ckpt, export=False)
    with pytest.raises(ValueError, match="exceeds the mini-GPT's block_size=32"):
        quiet_trainer(max_steps=1, default_root_dir=tmp_path).fit(again, datamodule=too_long)
