"""Tokenizers: the mini-GPT's (character, byte and locally trained BPE), and the two helpers that
treat those and Hugging Face tokenizers alike (`encode`, `special_ids`).

The one home for tokenizers: datamodules make them from their corpus, models receive them (and
rebuild them from a checkpoint with `tokenizer_from_state`). Each mini-GPT tokenizer turns into
a small JSON-able dict (`state_dict()`) and back, so a checkpoint carries its tokenizer and
sampling needs nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol

TOKENIZERS = ("char", "byte", "bpe")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One id per distinct character of the text it was built from (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("CharTokenizer needs a non-empty string of distinct characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the character vocabulary built from the training "
                "text; use tokenizer='byte' or 'bpe' for text with unseen characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes as ids (vocabulary 256): any text encodes, nothing to train."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # a sampled sequence may cut a multi-byte character: replace rather than fail
        return bytes(ids).decode("utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained locally with Hugging Face `tokenizers`."""

    kind = "bpe"

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise ValueError(f"bpe_vocab_size must be >= {len(alphabet)} (the byte alphabet), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
        )
        # train from chunks of lines: the trainer counts words per chunk, so chunking is exact
        lines = text.splitlines(keepends=True)
        chunks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self._tok.to_str()}


def train_tokenizer(kind: str, text: str, bpe_vocab_size: int = 512) -> Tokenizer:
    """Build tokenizer `kind` ("char", "byte" or "bpe") from the training text."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, bpe_vocab_size)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Inverse of `state_dict()`."""
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(state["json"]))
    raise ValueError(f"unknown tokenizer state kind {kind!r}; expected one of {TOKENIZERS}")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for a Hugging Face or a mini-GPT tokenizer."""
    try:
        from transformers import PreTrainedTokenizerBase

        if isinstance(tokenizer, PreTrainedTokenizerBase):
            return list(tokenizer.encode(text, add_special_tokens=False))
    except ImportError:  # transformers is a dependency; this keeps the helper usable without it
        pass
    return list(tokenizer.encode(text))


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """(bos, eos, pad) ids; a tokenizer without them (the mini-GPT's) gets None, None, 0."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else 0
    return bos, eos, pad
