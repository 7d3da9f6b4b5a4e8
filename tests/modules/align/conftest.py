"""Tiny backbones for the DPO tests: a character-level mini-GPT trained a few steps on the plays
(context 32: an 8-character prompt and 16 new characters fit), and a tiny Llama saved locally."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    from datamodules.shakespeare import ShakespeareDataModule
    from modules.gpt.module import GPTModule
    from tests.helpers import quiet_trainer

    root = tmp_path_factory.mktemp("tiny-sft")
    torch.manual_seed(0)
    dm = ShakespeareDataModule(corpus="shakespeare-plays", tokenizer="char", block_size=32, batch_size=8)
    trainer = quiet_trainer(max_steps=20, limit_val_batches=0, default_root_dir=root)
    trainer.fit(GPTModule(n_layer=1, n_head=2, n_embd=32, lr=1e-2, warmup_steps=2, sample_tokens=0), datamodule=dm)
    trainer.save_checkpoint(root / "sft.ckpt")
    return str(root / "sft.ckpt")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.modules.finetune.conftest import make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama-dpo")
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def count_e(texts: list[str]) -> list[float]:
    """A dense reward for models too young to write words VADER knows: the share of letters 'e'."""
    return [t.count("e") / max(len(t), 1) for t in texts]


def sample_pairs(backbone: str, path, **kw) -> str:
    """The pairs stage on a tiny model: PairSampler over corpus prompts, labelled by `count_e`, as JSONL."""
    import json

    from datamodules.preference import PromptDataModule
    from modules.align.pairs import PairSampler
    from tests.helpers import quiet_trainer

    args = dict(n_prompts=48, n_eval_prompts=6, prompt_chars=8, max_new_tokens=16, reward=f"{__name__}.count_e")
    sampler = PairSampler(backbone=backbone, samples_per_prompt=4)
    quiet_trainer(max_steps=0, limit_val_batches=0, num_sanity_val_steps=0).fit(
        sampler, datamodule=PromptDataModule(**{**args, **kw}))
    path.write_text("".join(json.dumps(r) + "\n" for r in sampler.rows))
    return str(path)


@pytest.fixture(scope="session")
def sft_pairs(sft_ckpt, tmp_path_factory):
    return sample_pairs(sft_ckpt, tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def preference_data(pairs: str, **kw):
    from datamodules.preference import PreferenceDataModule

    args = dict(n_eval_prompts=6, max_new_tokens=16, batch_size=8, reward=f"{__name__}.count_e")
    return PreferenceDataModule(source=pairs, **{**args, **kw})
