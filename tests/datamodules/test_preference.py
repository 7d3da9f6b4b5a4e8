"""Prompts and preference pairs: corpus prompts, best-vs-worst pairs, pairs read from local files
(jsonl through pandas, a folder through `datasets`, as a hub dataset would be, the pairs stage's
file with its splits and scores)."""

from __future__ import annotations

import json

import pytest

from datamodules.preference import PreferenceDataModule, PromptDataModule, VaderReward, all_pairs, best_and_worst
from datamodules.tokenizers import ByteTokenizer

RECORDS = [{"q": f"Question {i}: ", "good": f"a fine kind answer {i}", "bad": f"a bad answer {i}!"} for i in range(20)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_vader_reward_reads_sentiment():
    r = VaderReward()(["I love this sweet good day", "the weather", "I hate this cruel death"])
    assert r[0] > 0.5 and r[1] == 0 and r[2] < -0.5


def test_reward_may_be_a_function_named_by_its_import_path():
    dm = PromptDataModule(reward="tests.helpers.count_e")
    assert dm.reward(["eee", "xyz"]) == [1.0, 0.0]


def test_jsonl_pairs_split_and_collate_chosen_first_with_prompt_masked(tmp_path):
    src = write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
    dm = PreferenceDataModule(source=str(src), reward=None, fields={"prompt": "q", "chosen": "good", "rejected": "bad"},
                              val_fraction=0.2, test_fraction=0.1, batch_size=4, seed=3)
    dm.set_tokenizer(ByteTokenizer())
    sizes = {s: len(dm._tokenised(s)) for s in ("train", "val", "test")}
    # test_fraction is cut from the end of the validation share (datamodules.text): train stays 16
    assert sizes == {"train": 16, "val": 2, "test": 2}
    seen = [r["prompt"] for s in ("train", "val", "test") for r in dm.records[s]]  # records use our names
    assert sorted(seen) == sorted(r["q"] for r in RECORDS)  # a partition of the records
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 4  # 2 pairs: 2 chosen rows, then 2 rejected
    tok = ByteTokenizer()
    for i, rec in enumerate(dm.records["val"]):
        for row, answer in ((i, rec["chosen"]), (i + 2, rec["rejected"])):
            n_prompt, n = len(rec["prompt"].encode()), len((rec["prompt"] + answer).encode())
            assert tok.decode(batch["input_ids"][row, :n].tolist()) == rec["prompt"] + answer
            assert (batch["labels"][row, :n_prompt] == -100).all()
            assert tok.decode(batch["labels"][row, n_prompt:n].tolist()) == answer
            assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
    assert "fine kind" in dm.records["val"][0]["chosen"] and "bad" in dm.records["val"][0]["rejected"]
    assert dm.eval_prompts("val") == [r["prompt"] for r in dm.records["val"]]
    no_test = PreferenceDataModule(source=str(src), reward=None, fields=dm.fields, val_fraction=0.2, test_fraction=0,
                                   seed=3)
    no_test._ensure_records()
    assert no_test.records["train"] == dm.records["train"] and not no_test.has_test_split


def test_a_local_folder_loads_through_datasets_like_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": r["q"], "chosen": r["good"], "rejected": r["bad"]} for r in RECORDS])
    dm = PreferenceDataModule(source=str(folder), reward=None, val_fraction=0.25, test_fraction=0.0, batch_size=5)
    dm.set_tokenizer(ByteTokenizer())
    assert len(dm._tokenised("train")) == 15 and len(dm._tokenised("val")) == 5 and not dm.has_test_split


def test_corpus_prompts_are_whole_words_and_held_out_apart():
    dm = PromptDataModule(n_prompts=40, n_eval_prompts=8, prompt_chars=24, batch_size=16, reward=None)
    p = dm.prompts
    assert len(p["train"]) == 40 and len(p["val"]) == len(p["test"]) == 8
    assert not set(p["train"]) & set(p["val"] + p["test"]) and not set(p["val"]) & set(p["test"])
    assert all(len(x) <= 25 and x.endswith(" ") for x in p["train"])
    again = PromptDataModule(n_prompts=40, n_eval_prompts=8, seed=5, reward=None)  # seed orders, prompt_seed draws
    assert again.prompts == p and dm.eval_prompts("test") == p["test"]
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 16 and set(batch) <= set(p["train"])


def test_prompt_draws_nest_so_a_pairs_stage_can_hold_out_more_than_the_policies_sample():
    small = PromptDataModule(n_prompts=40, n_eval_prompts=8, reward=None).prompts
    large = PromptDataModule(n_prompts=200, n_eval_prompts=32, reward=None).prompts
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        assert large[split][:n] == small[split], split
    other = PromptDataModule(n_prompts=40, n_eval_prompts=8, reward=None, prompt_seed=1).prompts
    assert other["test"] != small["test"]  # prompt_seed draws


def test_best_and_worst_pick_by_score_and_keep_ties():
    rows = best_and_worst(["a ", "b "], [["x", "y", "z"], ["u", "v", "w"]], [0.1, 0.9, -0.5, 0.2, 0.2, 0.2])
    assert rows[0] == {"prompt": "a ", "chosen": "y", "rejected": "z", "score_chosen": 0.9, "score_rejected": -0.5}
    assert rows[1]["score_chosen"] == rows[1]["score_rejected"]  # a tie: kept, the reader drops it


def test_all_pairs_are_every_comparison_with_a_gap_and_a_tied_prompt_keeps_one_row():
    rows = all_pairs(["a ", "b "], [["x", "y", "z", "w"], ["u", "v"]], [0.1, 0.9, -0.5, 0.1, 0.2, 0.2])
    got = {(r["chosen"], r["rejected"]) for r in rows if r["prompt"] == "a "}
    assert got == {("y", "x"), ("y", "z"), ("y", "w"), ("x", "z"), ("w", "z")}  # x and w tie: no pair
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows if r["prompt"] == "a ")
    tied = [r for r in rows if r["prompt"] == "b "]
    assert len(tied) == 1 and tied[0]["score_chosen"] == tied[0]["score_rejected"]


def test_the_pairs_stage_file_keeps_its_splits_and_min_margin_filters_when_read(tmp_path):
    gaps = [0.0, 0.2, 0.6, 0.9]
    rows = [{"split": s, "prompt": f"{s} {i} ", "chosen": "good", "rejected": "bad", "score_chosen": g,
             "score_rejected": 0.0} for s in ("train", "val", "test") for i, g in enumerate(gaps)]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(source=str(src), reward=None, n_eval_prompts=3)
    dm._ensure_records()
    assert [r["prompt"] for r in dm.records["train"]] == ["train 1 ", "train 2 ", "train 3 "]  # the tie is gone
    assert dm.eval_prompts("test") == ["test 0 ", "test 1 ", "test 2 "]  # held-out prompts count ties too
    wide = PreferenceDataModule(source=str(src), reward=None, min_margin=0.5)
    wide._ensure_records()
    assert [r["prompt"] for r in wide.records["val"]] == ["val 2 ", "val 3 "] and wide.has_test_split


@pytest.mark.parametrize("kwargs, error, match", [
    ({"min_margin": -0.1}, ValueError, "min_margin must be >= 0"),
    ({"reward": "bert"}, ValueError, "reward must be one of"),
    ({"reward": "json.no_such_function"}, ValueError, "dotted path of a function"),
    ({"source": "./missing.jsonl"}, FileNotFoundError, "does not exist"),
    ({"val_fraction": 0.1, "test_fraction": 0.1}, ValueError, r"test_fraction must be in \[0, val_fraction=0.1\)"),
])
def test_bad_arguments_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PreferenceDataModule(**kwargs)


def test_missing_columns_name_the_fix(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    dm = PreferenceDataModule(source=str(src), reward=None)
    with pytest.raises(ValueError, match="lacks column.*fields="):
        dm._ensure_records()


def test_min_margin_needs_scores_and_a_missing_source_names_the_fix(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["q"], "chosen": r["good"], "rejected": r["bad"]} for r in RECORDS])
    with pytest.raises(ValueError, match="needs score_chosen and score_rejected"):
        PreferenceDataModule(source=str(src), reward=None, min_margin=0.1)._ensure_records()
    with pytest.raises(ValueError, match="has no source.*pairs stage"):
        PreferenceDataModule()._ensure_records()
