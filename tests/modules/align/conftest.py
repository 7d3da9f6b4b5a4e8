"""The DPO tests' helpers (the backbones are session fixtures of tests/conftest.py)."""

from __future__ import annotations


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
