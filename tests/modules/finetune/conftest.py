"""Tiny backbones made on the spot: a Llama-architecture HF model saved with `save_pretrained`
(loaded back through the real `from_pretrained` path) and a mini-GPT checkpoint pretrained for a
few steps under a plain Trainer (the lora-vs-full study pretrains its base as a pipeline run)."""

from __future__ import annotations

import pytest
import torch



def make_tokenizer():
    """A byte-level BPE (vocabulary 320) trained offline on Python's docs, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules.instruct import python_docs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(python_docs()[:10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_minigpt_ckpt(tmp_path_factory):
    """A byte-level mini-GPT (block 32) trained 3 steps on Shakespeare, as a Lightning checkpoint."""
    from datamodules.shakespeare import ShakespeareDataModule
    from modules.gpt.module import GPTModule
    from tests.helpers import quiet_trainer

    root = tmp_path_factory.mktemp("tiny-minigpt")
    torch.manual_seed(1)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, default_root_dir=root)
    dm = ShakespeareDataModule(corpus="shakespeare-plays", tokenizer="byte", block_size=32, batch_size=4,
                               max_chars=20000)
    trainer.fit(GPTModule(n_layer=1, n_head=2, n_embd=32, warmup_steps=1, sample_tokens=0), datamodule=dm)
    trainer.save_checkpoint(root / "base.ckpt")
    return str(root / "base.ckpt")
