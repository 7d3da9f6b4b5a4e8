"""The fine-tuning core: loss against Hugging Face's, LoRA parameter counts against the formula,
learning-rate defaults, backbone spec resolution."""

from __future__ import annotations

import pytest
import torch

from modules.finetune.backbone import pick_checkpoint, resolve_backbone
from modules.finetune.model import (
    MINIGPT_TARGETS,
    MiniGPTForCausalLM,
    causal_lm_loss,
    default_lr,
    weights_bytes,
)
from modules.finetune.methods import MethodArgs, lora
from modules.gpt.model import GPT, GPTConfig


def test_causal_lm_loss_matches_transformers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked prompt
    labels[2, 9:] = -100  # and padding
    out = model(input_ids=ids, labels=labels)
    ours, n = causal_lm_loss(out.logits, labels)
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


def test_lora_on_minigpt_trains_exactly_the_low_rank_factors():
    from peft import get_peft_model

    c = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = get_peft_model(MiniGPTForCausalLM(GPT(c)), lora(MethodArgs(r=4, dropout=0.0, minigpt=True)))
    r, d = 4, c.n_embd
    # per block: c_attn d->3d, attn.c_proj d->d, mlp.c_fc d->4d, mlp.c_proj 4d->d; LoRA adds r(in + out)
    expected = c.n_layer * r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected
    assert all("lora_" in n for n in trainable)
    assert not any("lm_head" in n or "wte" in n for n in trainable)
    assert model.peft_config["default"].lora_alpha == 2 * r  # alpha None -> 2 r
    assert set(model.peft_config["default"].target_modules) == set(MINIGPT_TARGETS)
    x = torch.randint(0, 256, (2, 8))
    assert model(input_ids=x).shape == (2, 8, 256)


def test_lora_config_defaults_to_all_linear_for_hf_and_validates():
    assert lora(MethodArgs(r=8, alpha=16)).target_modules == "all-linear"
    assert lora(MethodArgs(r=8, target_modules=["q_proj"], use_dora=True)).use_dora
    with pytest.raises(ValueError, match="rank r"):
        lora(MethodArgs(r=0, minigpt=True))
    with pytest.raises(ValueError, match="lora_dropout"):
        lora(MethodArgs(r=4, dropout=1.5, minigpt=True))


def test_default_lr_follows_practice():
    sizes = [1e6, 1.24e8, 1e9, 8e9]
    full = [default_lr("full", int(n)) for n in sizes]
    lora = [default_lr("lora", int(n)) for n in sizes]
    assert full == sorted(full, reverse=True) and lora == sorted(lora, reverse=True)
    assert all(lo > fu for lo, fu in zip(lora, full))  # LoRA always takes the larger rate
    assert 1e-5 <= full[-1] <= 2e-5  # 8B full fine-tuning (Alpaca / Llama recipes)
    assert 5e-5 <= full[1] <= 1.5e-4  # GPT-2 small
    assert 2e-4 <= lora[-1] <= 3e-4  # QLoRA paper: 2e-4 for 7B-13B
    assert default_lr("qlora", 10**9) == default_lr("lora", 10**9)


def test_resolve_backbone(tmp_path, tiny_llama_dir, tiny_minigpt_ckpt):
    assert resolve_backbone(str(tiny_llama_dir)) == ("hf", str(tiny_llama_dir.resolve()))
    assert resolve_backbone(tiny_minigpt_ckpt) == ("minigpt", tiny_minigpt_ckpt)
    assert resolve_backbone("HuggingFaceTB/SmolLM2-135M") == ("hf", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_backbone("./missing/model.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_backbone(str(tmp_path / "empty"))
    assert pick_checkpoint(["a/epoch=0-step=5.ckpt", "a/epoch=1-step=20.ckpt", "a/x.ckpt"]) == "a/epoch=1-step=20.ckpt"
    assert pick_checkpoint(["a/best.ckpt", "a/last.ckpt"]) == "a/last.ckpt"


def test_weights_bytes_counts_weight_files_only(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "adapter_config.json").write_text("{}" * 50)
    (tmp_path / "README.md").write_text("hello")
    assert weights_bytes(tmp_path) == 100



def test_an_architecture_folder_starts_from_random_weights():
    """configs/finetune/arch/tiny-llama holds a config and a tokenizer, no weights: the peft-methods
    study's `llama` stage pretrains it from the seed's random weights."""
    from pathlib import Path

    from modules.finetune.module import FinetuneModule

    folder = Path(__file__).resolve().parents[3] / "configs" / "finetune" / "arch" / "tiny-llama"
    module = FinetuneModule(str(folder), "full", export=False)
    with pytest.warns(UserWarning, match="no weights: the model starts from random weights"):
        module.configure_model()
    assert module.kind == "hf" and module.n_total == module.n_trainable > 500_000
    assert len(module.tokenizer) == module.backbone.config.vocab_size == 320
