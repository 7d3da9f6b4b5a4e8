"""Preference pairs: sampled from a model and labelled by VADER, or read from local files (jsonl
through pandas, a folder through `datasets`, as a hub dataset would be)."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.preference import PairCollator, PreferenceDataModule, VaderReward
from datamodules.tokenizers import ByteTokenizer

RECORDS = [{"q": f"Question {i}: ", "good": f"a fine kind answer {i}", "bad": f"a bad answer {i}!"} for i in range(20)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_vader_reward_reads_sentiment():
    r = VaderReward()(["I love this sweet good day", "the weather", "I hate this cruel death"])
    assert r[0] > 0.5 and r[1] == 0 and r[2] < -0.5


def test_reward_may_be_a_function_named_by_its_import_path():
    dm = PreferenceDataModule(reward="tests.modules.align.conftest.count_e")
    assert dm.reward(["eee", "xyz"]) == [1.0, 0.0]


def test_jsonl_pairs_split_and_collate_chosen_first_with_prompt_masked(tmp_path):
    src = write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
    dm = PreferenceDataModule(source=str(src), reward=None, fields={"prompt": "q", "chosen": "good", "rejected": "bad"},
                              val_fraction=0.2, test_fraction=0.1, batch_size=4, seed=3)
    dm.set_tokenizer(ByteTokenizer())
    sizes = {s: len(dm._tokenised(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 14, "val": 4, "test": 2}
    seen = [r["prompt"] for s in ("train", "val", "test") for r in dm.records[s]]  # records use our names
    assert sorted(seen) == sorted(r["q"] for r in RECORDS)  # a partition of the records
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 8  # 4 pairs: 4 chosen rows, then 4 rejected
    tok = ByteTokenizer()
    for i, rec in enumerate(dm.records["val"]):
        for row, answer in ((i, rec["chosen"]), (i + 4, rec["rejected"])):
            n_prompt, n = len(rec["prompt"].encode()), len((rec["prompt"] + answer).encode())
            assert tok.decode(batch["input_ids"][row, :n].tolist()) == rec["prompt"] + answer
            assert (batch["labels"][row, :n_prompt] == -100).all()
            assert tok.decode(batch["labels"][row, n_prompt:n].tolist()) == answer
            assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
    assert "fine kind" in dm.records["val"][0]["chosen"] and "bad" in dm.records["val"][0]["rejected"]
    assert dm.eval_prompts("val") == [r["prompt"] for r in dm.records["val"]]


def test_a_local_folder_loads_through_datasets_like_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": r["q"], "chosen": r["good"], "rejected": r["bad"]} for r in RECORDS])
    dm = PreferenceDataModule(source=str(folder), reward=None, val_fraction=0.25, test_fraction=0.0, batch_size=5)
    dm.set_tokenizer(ByteTokenizer())
    assert len(dm._tokenised("train")) == 15 and len(dm._tokenised("val")) == 5 and not dm.has_test_split


class FakePolicy:
    """A stand-in for DPOModule: samples are drawn from fixed phrases, so the labels are known."""

    PHRASES = ["and love and joy", "the stone wall", "death and hate", "a good sweet friend"]

    def __init__(self, source):
        self.source, self.tokenizer, self.calls = source, ByteTokenizer(), 0

    def sample_completions(self, prompts, n, max_new_tokens, temperature, seed, reference):
        assert reference  # pairs come from the supervised model, pi_ref
        self.calls += 1
        g = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(self.PHRASES), (len(prompts), n), generator=g).tolist()
        return [[self.PHRASES[j] for j in row] for row in picks]


def sampled(tmp_path, model, **kw):
    dm = PreferenceDataModule(n_prompts=40, n_eval_prompts=8, samples_per_prompt=3, cache_dir=str(tmp_path), **kw)
    dm.trainer = type("T", (), {"lightning_module": model})()
    return dm


def test_sampled_pairs_are_best_against_worst_and_ties_give_none(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights-1")
    model = FakePolicy(str(ckpt))
    dm = sampled(tmp_path, model)
    dm._ensure_records()
    score = dict(zip(FakePolicy.PHRASES, VaderReward()(FakePolicy.PHRASES)))
    assert len(set(score.values())) == 4  # four distinct scores, so best and worst are unambiguous
    rows = dm.records["train"]
    assert 0 < len(rows) < 40  # some prompts drew three equal phrases: no pair
    for r in rows:
        assert score[r["chosen"]] == r["score_chosen"] > r["score_rejected"] == score[r["rejected"]]
    prompts = dm.corpus_prompts()
    assert len(prompts["val"]) == len(prompts["test"]) == 8 and not set(prompts["train"]) & set(prompts["val"])
    assert all(len(p) <= 25 and p.endswith(" ") for p in prompts["train"])
    # offline: written once, then read back; a different model file gets pairs of its own
    again = sampled(tmp_path, model)
    again._ensure_records()
    assert model.calls == 3 and again.records == dm.records and again.pairs_file == dm.pairs_file
    wide = sampled(tmp_path, model, min_margin=0.5)
    wide._ensure_records()
    assert model.calls == 3 and wide.pairs_file == dm.pairs_file  # the same samples, filtered when read
    assert wide.records["train"] == [r for r in rows if r["score_chosen"] - r["score_rejected"] > 0.5]
    assert 0 < len(wide.records["train"]) < len(rows)
    ckpt.write_bytes(b"weights-2")
    other = sampled(tmp_path, model)
    other._ensure_records()
    assert model.calls == 6 and other.pairs_file != dm.pairs_file


@pytest.mark.parametrize("kwargs, error, match", [
    ({"samples_per_prompt": 1}, ValueError, "samples_per_prompt must be >= 2"),
    ({"min_margin": -0.1}, ValueError, "min_margin must be >= 0"),
    ({"reward": None}, ValueError, "needs a reward"),
    ({"reward": "bert"}, ValueError, "reward must be one of"),
    ({"reward": "json.no_such_function"}, ValueError, "dotted path of a function"),
    ({"source": "./missing.jsonl"}, FileNotFoundError, "does not exist"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, ValueError, "val_fraction \\+ test_fraction < 1"),
])
def test_bad_arguments_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PreferenceDataModule(**kwargs)


def test_missing_columns_name_the_fix(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    dm = PreferenceDataModule(source=str(src), reward=None)
    with pytest.raises(ValueError, match="lacks column.*fields="):
        dm._ensure_records()


def test_sampling_needs_a_model_that_samples(tmp_path):
    dm = sampled(tmp_path, object())
    with pytest.raises(ValueError, match="sample_completions"):
        dm._ensure_records()
