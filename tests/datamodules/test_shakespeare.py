"""ShakespeareDataModule: corpora, tokenizers, the step-seeded batch stream, fixed validation."""

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import datamodules.shakespeare as sh
from datamodules.shakespeare import RandomWindowBatches, ShakespeareDataModule, play_to_text
from datamodules.tokenizers import tokenizer_from_state, train_tokenizer
from tests.data import shakespeare_text

TEXT = shakespeare_text()
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcødé — ok?\n"


def tiny_dm(**kw) -> ShakespeareDataModule:
    args = dict(corpus="tinyshakespeare", path=str(TEXT), max_chars=20_000, block_size=16, batch_size=4, val_windows=10)
    args.update(kw)
    return ShakespeareDataModule(**args)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizers_round_trip_and_serialise(kind):
    text = TEXT.read_text()[:30_000] + SAMPLE
    tok = train_tokenizer(kind, text, bpe_vocab_size=300)
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SAMPLE
    again = tokenizer_from_state(tok.state_dict())
    assert again.vocab_size == tok.vocab_size and again.encode(SAMPLE) == ids
    if kind == "bpe":
        assert len(ids) < len(SAMPLE.encode())  # merges happened: fewer tokens than bytes


def test_char_tokenizer_names_unseen_character():
    tok = train_tokenizer("char", "abc")
    with pytest.raises(ValueError, match="'z'.*byte"):
        tok.encode("abz")


def test_tinyshakespeare_ships_with_the_package_and_matches_nanogpt():
    # No path, no network: the packaged copy, which must be the exact nanoGPT corpus.
    text = sh.load_tinyshakespeare()
    assert hashlib.md5(text.encode("utf-8")).hexdigest() == "6fb458f1232090904fb40fe944165e91"
    assert len(text) == 1_115_394
    dm = tiny_dm(path=None, max_chars=None)
    dm.setup()
    # nanoGPT's shakespeare_char prepare.py: 65 characters, 1,003,854 train / 111,540 val tokens
    assert dm.tokenizer.vocab_size == 65
    assert (len(dm.train_data), len(dm.val_data)) == (1_003_854, 111_540)


def test_play_markdown_becomes_speaker_lines():
    md = (
        "# Othello\n\n## ACT I\n\n### SCENE I. Venice.\n\n_Enter RODERIGO and IAGO,\nwith torches_\n\n"
        "**RODERIGO**  \nTush! never tell me;  \nI take it _\\[Aside]_ unkindly  \n\n_Exit_\n\n"
        "**IAGO**  \n'Sblood, but you will not hear me:\n"
    )
    assert play_to_text(md) == "RODERIGO:\nTush! never tell me;\nI take it unkindly\n\nIAGO:\n'Sblood, but you will not hear me:\n"


def test_plays_corpus_is_plain_text():
    text = sh.load_plays()
    assert len(text) > 4_000_000  # 38 plays
    assert "HAMLET:\n" in text and "To be, or not to be" in text
    for mark in ("**", "##", "_", "\\["):
        assert mark not in text


def test_batch_is_pure_function_of_seed_and_step():
    data = torch.arange(1000)
    a = RandomWindowBatches(data, 8, 4, seed=1)
    b = RandomWindowBatches(data, 8, 4, seed=1)
    x, y = a.batch(7)
    assert torch.equal(x, b.batch(7)[0])
    assert not torch.equal(x, a.batch(8)[0])
    assert not torch.equal(x, RandomWindowBatches(data, 8, 4, seed=2).batch(7)[0])
    # windows are contiguous and y is x shifted by one token
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 7, dtype=torch.long))
    assert torch.equal(y, x + 1)


def test_ranks_split_the_global_batch():
    data = torch.randperm(5000)
    single = RandomWindowBatches(data, 8, 6, seed=3).batch(11)[0]  # one process, global batch 6
    parts = [RandomWindowBatches(data, 8, 3, seed=3, rank=r, world_size=2).batch(11)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), single)


def test_train_loader_resumes_at_global_step():
    dm = tiny_dm()
    dm.setup()
    fresh = iter(dm.train_dataloader())
    stream = [next(fresh)[0] for _ in range(6)]
    dm.trainer = SimpleNamespace(global_step=4, global_rank=0, world_size=1)
    resumed = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(resumed, stream[4])


def test_workers_keep_step_order():
    dm = tiny_dm(num_workers=2)
    dm.setup()
    it = iter(dm.train_dataloader())
    got = [next(it)[0] for _ in range(4)]
    for s, x in enumerate(got):
        assert torch.equal(x, dm.train_dataset().batch(s)[0])


def test_validation_windows_fixed_and_fingerprint():
    a, b = tiny_dm(), tiny_dm()
    a.setup(), b.setup()
    assert torch.equal(a.val_windows_tensor()[0], b.val_windows_tensor()[0])
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    c = tiny_dm(tokenizer="byte")
    c.setup()
    assert c.fingerprint() != a.fingerprint()
    batches = list(a.val_dataloader())
    assert sum(x.size(0) for x, _ in batches) == 10


def test_whole_split_validation_scores_every_token_once():
    dm = tiny_dm(val_windows=None)
    dm.setup()
    x, y = dm.val_windows_tensor()
    n = (len(dm.val_data) - 1) // 16  # consecutive windows of 16 that still have a next token
    assert x.shape == y.shape == (n, 16)
    torch.testing.assert_close(x.reshape(-1), dm.val_data[: n * 16])
    torch.testing.assert_close(y.reshape(-1), dm.val_data[1 : n * 16 + 1])


def test_test_split_is_cut_from_validation_and_leaves_training_alone():
    a, b = tiny_dm(), tiny_dm(test_fraction=0.05)
    a.setup(), b.setup()
    # no test split: the pipeline does not test, and the fingerprint stays that of
    # runs logged before test splits existed (golden, from the code before this change)
    assert not a.has_test_split and b.has_test_split  # the pipeline tests only b
    with pytest.raises(ValueError, match="no test split: set test_fraction"):
        a.test_dataloader()
    assert a.fingerprint() == "82cb092572c81d8e7c9aa4850fd4209a683cbd467b8539a0e6363ee97be51ab3"
    assert b.fingerprint() != a.fingerprint()
    # the training text and stream are unchanged; val + test is the old validation text, test at its end
    assert torch.equal(a.train_data, b.train_data)
    for s in range(3):
        assert torch.equal(a.train_dataset().batch(s)[0], b.train_dataset().batch(s)[0])
    assert len(b.test_data) == 1000  # 5% of 20,000 characters
    assert torch.equal(torch.cat([b.val_data, b.test_data]), a.val_data)
    # the test loader scores the test tokens only, each once, in consecutive windows
    x, y = (torch.cat(t) for t in zip(*b.test_dataloader()))
    n = (len(b.test_data) - 1) // 16
    assert torch.equal(x.reshape(-1), b.test_data[: n * 16]) and torch.equal(y.reshape(-1), b.test_data[1 : n * 16 + 1])


def test_packaged_corpus_is_checked_and_installed(monkeypatch):
    """A damaged packaged copy is refused by its md5, and the wheel carries the file (package-data)."""
    import tomllib

    pyproject = tomllib.loads((Path(sh.__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*.gz" in pyproject["tool"]["setuptools"]["package-data"]["datamodules"]
    monkeypatch.setattr(sh, "TINYSHAKESPEARE_MD5", "0" * 32)
    sh.load_tinyshakespeare.cache_clear()
    try:
        with pytest.raises(ValueError, match="md5 mismatch.*path="):
            sh.load_tinyshakespeare()
    finally:
        sh.load_tinyshakespeare.cache_clear()


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(corpus="tiny"), ValueError, "corpus must be one of"),
        (dict(tokenizer="word"), ValueError, "tokenizer must be one of"),
        (dict(path="x.txt", corpus="shakespeare-plays"), ValueError, "only read for corpus='tinyshakespeare'"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(train_frac=1.0), ValueError, "train_frac"),
        (dict(test_fraction=-0.1), ValueError, "test_fraction must be in"),
        (dict(test_fraction=0.1), ValueError, r"1 - train_frac = 0.1\)"),  # would leave no validation text
    ],
)
def test_bad_arguments_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        tiny_dm(**kw)


def test_missing_path_and_short_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="path="):
        tiny_dm(path=str(tmp_path / "nope.txt")).setup()
    with pytest.raises(ValueError, match="too few for block_size"):
        tiny_dm(max_chars=100, block_size=64).setup()
    with pytest.raises(ValueError, match="test split has 10 tokens"):
        tiny_dm(test_fraction=0.0005).setup()
