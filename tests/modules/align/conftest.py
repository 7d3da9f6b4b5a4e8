"""The DPO tests' fixtures (the backbones are session fixtures of tests/conftest.py; the helpers are in
tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import sample_pairs


@pytest.fixture(scope="session")
def sft_pairs(sft_ckpt, tmp_path_factory):
    return sample_pairs(sft_ckpt, tmp_path_factory.mktemp("pairs") / "pairs.jsonl")
