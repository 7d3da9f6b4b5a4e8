"""The DPO tests' helpers (the backbones are session fixtures of tests/conftest.py)."""

from __future__ import annotations


def count_e(texts: list[str]) -> list[float]:
    """A dense reward for models too young to write words VADER knows: the share of letters 'e'."""
    return [t.count("e") / max(len(t), 1) for t in texts]


def preference_data(tmp_path, **kw):
    from datamodules.preference import PreferenceDataModule

    args = dict(n_prompts=48, n_eval_prompts=6, prompt_chars=8, samples_per_prompt=4, max_new_tokens=16,
                batch_size=8, cache_dir=str(tmp_path / "cache"))
    dm = PreferenceDataModule(**{**args, **kw})
    dm.reward = count_e
    return dm
