"""InstructDataModule: prompt masking, formats, truncation, packing, text mode, errors."""

from __future__ import annotations

import json
import sys
import types

import pandas as pd
import pytest
import torch

from datamodules.instruct import ALPACA_NO_INPUT, InstructDataModule, python_docs
from datamodules.text import IGNORE_INDEX
from datamodules.tokenizers import ByteTokenizer

RECORDS = [
    {"question": f"What is {a} plus {b}?", "answer": f"It is {a + b}.", "topic": "math"}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (10, 20), (30, 40), (2, 2), (9, 9), (6, 1), (4, 4)]
]
FIELDS = {"instruction": "question", "response": "answer"}
TEMPLATE = "Q: {instruction}\nA: "


def write(tmp_path, fmt):
    path = tmp_path / f"qa.{fmt}"
    frame = pd.DataFrame(RECORDS)
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def setup_dm(source, tokenizer=None, **kw):
    dm = InstructDataModule(source=str(source), **kw)
    dm.set_tokenizer(tokenizer or ByteTokenizer())
    dm.setup("fit")
    return dm


def test_prompt_tokens_are_masked_and_response_is_the_target(tmp_path):
    dm = setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE, max_length=128, val_fraction=0.2)
    tok = ByteTokenizer()
    examples = dm.train_set.examples + dm.val_set.examples
    assert len(examples) == len(RECORDS)
    for ids, labels in examples:
        text = tok.decode(ids)
        prompt_len = len(tok.encode(text[: text.index("A: ") + 3]))
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]  # the response is learned token for token
        record = next(r for r in RECORDS if text.startswith(f"Q: {r['question']}"))
        assert tok.decode(labels[prompt_len:]) == record["answer"]


def test_batches_pad_with_ignored_labels(tmp_path):
    dm = setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pads = batch["attention_mask"] == 0
    assert pads.any()  # the answers differ in length
    assert (batch["labels"][pads] == IGNORE_INDEX).all()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_give_the_same_examples_as_jsonl(tmp_path, fmt):
    ref = setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE)
    other = setup_dm(write(tmp_path, fmt), fields=FIELDS, template=TEMPLATE)
    assert other.train_set.examples == ref.train_set.examples
    assert other.fingerprint() == ref.fingerprint()


def test_alpaca_template_and_hf_tokenizer_specials(tmp_path):
    from tests.helpers import make_tokenizer  # noqa: PLC0415 - shared tiny tokenizer

    tok = make_tokenizer()
    dm = setup_dm(write(tmp_path, "jsonl"), tokenizer=tok, fields=FIELDS, max_length=256)
    ids, labels = dm.train_set.examples[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[-1] == tok.eos_token_id  # the model learns to stop
    prompt = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX], skip_special_tokens=True)
    assert prompt.startswith(ALPACA_NO_INPUT.split("{")[0].rstrip())
    assert "### Response:" in prompt


def test_truncation_and_prompts_too_long(tmp_path):
    dm = setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE, max_length=26, val_fraction=0.5)
    assert all(len(ids) <= 26 for ids, _ in dm.train_set.examples + dm.val_set.examples)
    assert any(len(ids) == 26 for ids, _ in dm.train_set.examples + dm.val_set.examples)  # truncated
    # "Q: What is 10 plus 20?\nA: " and "... 30 plus 40 ..." are 26 bytes: they fill max_length and
    # leave nothing to learn, so they are dropped
    assert dm.dropped == 2
    with pytest.raises(ValueError, match="raise max_length"):
        setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE, max_length=8)


def test_packing_fills_blocks_and_keeps_the_mask(tmp_path):
    plain = setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE, max_length=64)
    packed = setup_dm(write(tmp_path, "jsonl"), fields=FIELDS, template=TEMPLATE, max_length=64, packing=True)
    blocks = packed.train_set.examples
    assert all(len(ids) == 64 for ids, _ in blocks[:-1]) and 0 < len(blocks[-1][0]) <= 64
    assert len(blocks) < len(plain.train_set.examples)  # fewer, fuller rows: no padding waste
    # the same tokens and labels in the same order, only re-cut
    assert [t for ids, _ in blocks for t in ids] == [t for ids, _ in plain.train_set.examples for t in ids]
    assert [t for _, lab in blocks for t in lab] == [t for _, lab in plain.train_set.examples for t in lab]


def test_text_mode_python_docs_and_txt(tmp_path):
    dm = setup_dm("python-docs", mode="text", max_length=64, max_records=5)
    assert all(len(ids) == 64 and lab == ids for ids, lab in dm.train_set.examples)
    assert len(python_docs()) > 50
    txt = tmp_path / "corpus.txt"
    txt.write_text("plain text for domain adaptation. " * 40)
    dm = setup_dm(txt, mode="text", max_length=32)
    n = len(txt.read_bytes())
    cut = int(n * 0.9)  # val_fraction 0.1: the tail of the token stream
    assert (len(dm.train_set), len(dm.val_set)) == (cut // 32, (n - cut) // 32)
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["input_ids"], batch["labels"])


def test_fingerprint_is_stable_and_tracks_the_data(tmp_path):
    a = setup_dm("python-docs", mode="text", max_length=64, max_records=4, seed=0)
    b = setup_dm("python-docs", mode="text", max_length=64, max_records=4, seed=0)
    c = setup_dm("python-docs", mode="text", max_length=64, max_records=4, seed=1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 64


def test_test_split_holds_out_the_end_of_the_validation_records(tmp_path):
    path = tmp_path / "qa20.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} squared?", "answer": f"{i * i}."}) for i in range(20)))
    kw = dict(fields=FIELDS, template=TEMPLATE, max_length=128, val_fraction=0.3, seed=3)
    a, b = setup_dm(path, **kw), setup_dm(path, test_fraction=0.1, **kw)
    assert not a.has_test_split and b.has_test_split  # the pipeline tests only b
    with pytest.raises(ValueError, match="no test split: set test_fraction"):
        a.test_dataloader()
    assert b.train_set.examples == a.train_set.examples  # training data do not move
    assert b.val_set.examples + b.test_set.examples == a.val_set.examples  # test: the last 2 of the 6 val records
    assert (len(b.val_set), len(b.test_set)) == (4, 2)
    tok = ByteTokenizer()
    # record level: the held-out questions are in no other split
    questions = {name: {tok.decode(ids).split("\n")[0] for ids, _ in data.examples}
                 for name, data in (("train", b.train_set), ("val", b.val_set), ("test", b.test_set))}
    assert sum(map(len, questions.values())) == 20 and len(set.union(*questions.values())) == 20
    assert b.fingerprint() != a.fingerprint()
    assert sum(batch["input_ids"].size(0) for batch in b.test_dataloader()) == 2

    # text mode: the tail of the token stream, training blocks unchanged
    c = setup_dm("python-docs", mode="text", max_length=64, max_records=4)
    d = setup_dm("python-docs", mode="text", max_length=64, max_records=4, test_fraction=0.05)
    assert d.train_set.examples == c.train_set.examples and len(d.test_set) > 0
    assert len(d.val_set) + len(d.test_set) <= len(c.val_set)  # both cut from the old validation tail
    blocks = {name: {tuple(ids) for ids, _ in data.examples} for name, data in
              (("train", d.train_set), ("val", d.val_set), ("test", d.test_set))}
    assert not blocks["test"] & (blocks["train"] | blocks["val"])


def test_hugging_face_dataset_name_goes_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return RECORDS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = setup_dm("someone/qa-set", fields=FIELDS, template=TEMPLATE)
    assert calls == [("someone/qa-set", "train")]
    assert len(dm.train_set) + len(dm.val_set) == len(RECORDS)


def test_hub_names_are_fetched_in_prepare_data_not_at_construction(monkeypatch):
    import transformers

    calls = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, split: calls.append(("dataset", name)) or RECORDS))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kw: calls.append(("tokenizer", name)) or ByteTokenizer())
    dm = InstructDataModule(source="someone/qa-set", tokenizer="someone/model", fields=FIELDS, template=TEMPLATE)
    assert calls == []  # a config instantiates offline
    dm.prepare_data()
    assert calls == [("dataset", "someone/qa-set"), ("tokenizer", "someone/model")]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InstructDataModule(source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="mode must be"):
        InstructDataModule(mode="chat")
    with pytest.raises(ValueError, match="not a key of fields"):
        InstructDataModule(source=str(write(tmp_path, "jsonl")), template="Q: {question}")
    with pytest.raises(ValueError, match=r"lack column\(s\) \['instruction', 'output'\]"):
        setup_dm(write(tmp_path, "jsonl"))  # default fields do not match this file's columns
    with pytest.raises(ValueError, match="set mode='text'"):
        setup_dm("python-docs")
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, val_fraction=0.1\)"):
        InstructDataModule(source="python-docs", mode="text", test_fraction=0.1)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        InstructDataModule(source="python-docs", mode="text", test_fraction=-0.01)
    txt = tmp_path / "corpus.txt"
    txt.write_text("plain text for domain adaptation. " * 40)  # 1360 bytes: 13 test tokens make no block of 32
    with pytest.raises(ValueError, match="38 train, 3 val and 0 test examples"):
        setup_dm(txt, mode="text", max_length=32, test_fraction=0.01)
    dm = InstructDataModule(source="python-docs", mode="text")
    with pytest.raises(ValueError, match="no tokenizer"):
        dm.setup("fit")
